"""Model creation (timm), architecture specs and the prunable-unit families."""
