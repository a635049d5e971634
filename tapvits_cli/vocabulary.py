"""The names tapvits shares between its command line, recipes, artifacts and stage logic.

Each name is defined here once. ``--help`` must stay free of numpy and torch, so the
options' choices cannot be read off the logic packages; copying them into the command
line instead let the copies drift (``score --budget`` accepted 0, ``allocate`` did not).
This module imports nothing but the standard library, so every layer may import it:
the CLI for its choices, the recipe checker, the artifact readers for what they accept,
and the logic for what it implements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# -- units ------------------------------------------------------------------------------------
# The prunable unit types of a transformer block, in execution order within the block:
# attention heads, then MLP hidden neurons. Plans, scores and pruning are keyed by them.
UNIT_KINDS = ("attn", "mlp")
# The model families whose units tapvits can score and prune (models/families/); scores and
# plans are only ever made for these.
PRUNABLE_FAMILIES = ("vit", "swin")

# -- names ------------------------------------------------------------------------------------
# Recipe, device and inbox names (protocol/recipe.md): they become folder names of a run
# directory, so nothing that could climb out of it or hide a character, and at most 100
# characters: a file name may have 255 bytes, and a 5,000-character name passed every check,
# then failed the run with exit 1. ``\Z``, not ``$``, which also matches before a final newline.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")

# -- seeds ------------------------------------------------------------------------------------
# What every library tapvits seeds accepts (NumPy and scikit-learn take 0..2³²−1): the range of
# --seed and of a recipe's ``seed``.
SEED_RANGE = (0, 2 ** 32 - 1)

# -- stages -----------------------------------------------------------------------------------
# The pipeline's stages in the order one device's chain runs them; also the sections of a
# recipe's ``stages`` (protocol/recipe.md).
PIPELINE_STAGES = ("fit-gmm", "features", "select", "score", "allocate", "prune", "finetune", "eval")
# Stages a recipe may switch off (``stages.finetune: false``); the others make inputs of later ones.
OPTIONAL_STAGES = ("finetune", "eval")

# -- feature extractors -----------------------------------------------------------------------
# Pretrained extractors known by name (``--extractor NAME``, a recipe's ``extractor``);
# any other value names a file (a model artifact or an ONNX features graph).
EFFICIENTNET_LITE0 = "efficientnet-lite0"
BUILT_IN_EXTRACTORS = (EFFICIENTNET_LITE0,)
# A recipe's ``extractor: base``: the base model the run trains or is given.
BASE_EXTRACTOR = "base"

# -- Gaussian mixtures (fit-gmm) --------------------------------------------------------------
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")   # scikit-learn's covariance_type
DP_COVARIANCE_TYPES = ("diag", "full")                     # those the differentially private fit supports
# Bounds of a mixture file, so that what a cloud allocates for an uploaded one stays small:
# scoring a pool holds a block of rows × K log-densities, and the range check projects every
# unit feature vector. Fits use K of 2 to 10; the widest common backbones give 4,096 features.
MAX_COMPONENTS = 1024
MAX_FEATURE_DIM = 16384
# Defaults of the differentially private fit (fit-gmm --dp-epsilon). Noise on every
# release grows with the projection's dimension and is spent again on every EM iteration:
# on 5 Fashion-MNIST devices (48-dim features, 4 noise seeds) d = 32 and 10 iterations
# gave selection precision@640 of about 50% at ε = 3, d = 16 and 4 iterations 99%
# (benchmarks/privacy_selection.py --sweep).
DP_DEFAULT_COMPONENTS = 4
DP_DEFAULT_DIM = 16
DP_DEFAULT_ITERATIONS = 4

# -- sizes ------------------------------------------------------------------------------------
# Bounds of sizes given on the command line or in a recipe, far beyond real use, so that a
# slip (10^6 for 16) is a usage error instead of gigabytes allocated or a machine's worth of
# threads and processes started.
MAX_BATCH = 1024          # images in one batch of a latency measurement or an export
MAX_WIDTH = 65536         # an MLP width to measure
MAX_TOKENS = 16384        # tokens per image in a latency profile
MAX_PARALLEL = 1024       # steps side by side (run --jobs), CPUs per step
MAX_WORKERS = 64          # DataLoader worker processes
MAX_PRIOR_DRAWS = 1_000_000   # draws of a device mixture for the class prior (each holds a row per class)

# -- selection (select) -----------------------------------------------------------------------
SELECTION_STRATEGIES = ("topk", "stratified", "ratio", "ratio-stratified", "class-prior", "random")
DEFAULT_SELECTION_STRATEGY = "class-prior"  # chosen on benchmarks/partitions.py (README "Selection")
RATIO_STRATEGIES = ("ratio", "ratio-stratified", "class-prior")  # need a public mixture: rank by density ratio
QUOTA_STRATEGIES = ("stratified", "ratio-stratified", "class-prior")  # quotas per component, or per pool class

# -- importance (score) -----------------------------------------------------------------------
CRITERIA = ("composite", "output-norm", "magnitude", "taylor", "random")
# Chosen on the partitions benchmark (issue 14), not from the paper: with class-prior selection the
# paper's composite fell below the unpruned base on non-IID devices, output-norm did not.
DEFAULT_CRITERION = "output-norm"

# -- allocation (allocate) --------------------------------------------------------------------
ALLOCATION_STRATEGIES = ("kl", "kl-power", "uniform", "global")
LAYER_IMPORTANCE_STRATEGIES = ("kl", "kl-power")   # those that read the KL probes
DEFAULT_ALLOCATION_STRATEGY = "kl"
BUDGET_KINDS = ("params", "macs")

# -- token merging (prune) --------------------------------------------------------------------
MERGE_METHODS = ("bipartite", "neighbour")

# -- latency (profile) ------------------------------------------------------------------------
# What a device's latency table is measured on (``profile --runtime``, a profile's runtime.name).
RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class Interval:
    """A range of real numbers with open or closed ends, shared by an option and its readers."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# The fraction of the whole model (parameters or MACs) a plan keeps: ``allocate --budget``,
# ``score --budget`` (whose KL probes then remove 1 − budget), a recipe's ``budget`` and the
# plan artifact's recorded budget. 0 keeps nothing, so it is not a budget; 1 keeps everything.
BUDGET_FRACTION = Interval(0.0, 1.0, low_open=True)

# Where `tapvits run` carries out its steps (pipeline/schedule.py).
EXECUTORS = ("serial", "local", "ray", "slurm")
