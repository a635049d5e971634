"""The stage API: options render the command line that parses back into the same options."""

from __future__ import annotations

import pickle

import pytest

from tapvits_cli.stages.common import command_line, recipe_keys

INPUT_SUFFIXES = (".safetensors", ".h5", ".onnx")
EXAMPLES = {
    "allocate": dict(scores_path="s.safetensors", output="p.safetensors", budget=0.5, strategy="uniform",
                     min_keep=0.2, allow_branch_removal=True, temperature=2.0, tolerance=0.01, model_path="m.safetensors"),
    "prune": dict(model_path="m.safetensors", plan_path="p.safetensors", output="o.safetensors", merge="bipartite",
                  merge_amount=2, merge_layers=[0, 2, 3], proportional_attention=False),
    "eval": dict(model_path="m.safetensors", data="digits:split=test", output="r.json", batch_size=8,
                 latency_batches="1,4", warmup_runs=2, no_latency=True, min_top1=0.5),
    "finetune": dict(architecture="vit_tiny_patch16_224", model_args=("img_size=8", "patch_size=4"), data="digits",
                     finetune_set="s.h5", output="m.safetensors", epochs=2, lr=0.0002, min_lr=0.0, augment="crop,flip",
                     warmup_fraction=0.2, teacher="t.safetensors", distill_weight=0.25, distill_temperature=2.0,
                     checkpoint_dir="ckpt", resume=True),
    "fit-gmm": dict(data="digits:classes=0,1", extractor_name="efficientnet-lite0", output="g.safetensors", pca_dim=8,
                    standardize=False, components=[2, 3, 5], covariance="diag", reg_covar=1e-4, dp_epsilon=3.0),
    "features": dict(data="digits", extractor_name="m.safetensors", output="f.h5", batch_size=16, restart=True),
    "select": dict(gmm="g.safetensors", pool="f.h5", output="s.h5", metric_size=32, finetune_size=64,
                   strategy="ratio", public_components=3, chunk_rows=100),
    "score": dict(model="m.safetensors", metric_set_path="s.h5", data="digits", output="sc.safetensors",
                  criterion="magnitude", mlp_weights="1,0,0", budget=0.5, batch_size=8, max_samples=16),
    "audit-gmm": dict(gmm="g.safetensors", private_ref="digits:classes=0,1", extractor_name="m.safetensors",
                      held_out_ref="digits:classes=0,1:fold=1/2", max_auc=0.6, batch_size=32),
    "export": dict(model="m.safetensors", output="m.onnx", features_graph=True, raw_input=(1, 8, 8), batch_size=2,
                   dynamic_batch=False, opset=17, check=False),
    "profile": dict(model_path="m.safetensors", output="d.profile.json", runtime="onnxruntime", batch_sizes="1,4",
                    tokens=5, widths="4,8", mlp_alignment=4, repeats=3, warmup_runs=1, threads=2),
    "create-model": dict(architecture="vit_tiny_patch16_224", output="m.safetensors",
                         model_args=("img_size=8", "patch_size=4"), weights="w.safetensors", class_names="a,b"),
    "dataset": dict(reference="digits:classes=0,1"),
    "validate": dict(paths=("a.safetensors", "b.h5")),
}
WITHOUT_OPTIONS = ("dataset", "validate")   # only arguments: nothing a recipe could set


def _command(stage: str):
    import importlib

    cli_names = {"eval": "eval_cmd", "dataset": "dataset_cmd", "validate": "validate_cmd"}
    module = importlib.import_module(f"tapvits_cli.cli.{cli_names.get(stage, stage).replace('-', '_')}")
    return module.command


def _stage(stage: str):
    import importlib

    return importlib.import_module(f"tapvits_cli.stages.{stage.replace('-', '_')}")


@pytest.mark.parametrize("stage", sorted(EXAMPLES))
def test_options_render_the_command_line_that_makes_them(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the inputs named must exist (click checks); the output must not
    for key, value in EXAMPLES[stage].items():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, str) and item.endswith(INPUT_SUFFIXES) and key != "output":
                (tmp_path / item).write_bytes(b"")
    module = _stage(stage)
    options = module.Options(**EXAMPLES[stage], seed=3, device="cpu")
    argv = command_line(options)
    assert argv[-4:] == ["--seed", "3", "--device", "cpu"]
    context = _command(stage).make_context(stage, argv[:-4])
    assert module.Options(**context.params, seed=3, device="cpu") == options
    assert pickle.loads(pickle.dumps(options)) == options    # a step can travel to another process


@pytest.mark.parametrize("stage", sorted(EXAMPLES))
def test_recipe_keys_are_options_of_the_subcommand(stage):
    flags = {opt.lstrip("-") for param in _command(stage).params for opt in param.opts}
    keys = recipe_keys(_stage(stage).Options)
    assert (not keys if stage in WITHOUT_OPTIONS else keys) and set(keys) <= flags
    assert "output" not in keys.values()


def test_logic_names_parameters_and_the_command_line_names_flags(tmp_path, tapvits, tiny_model_file):
    from tapvits_cli.cli.fit_gmm import command
    from tapvits_cli.cli.stage_call import flag_names
    from tapvits_cli.errors import ParameterError
    from tapvits_cli.gmm.fit import check_feasible

    with pytest.raises(ParameterError) as refused:
        check_feasible(500, 64, [2], "full", 80)
    assert str(refused.value) == "pca_dim 80 must lie in 1..64 (the feature dimension)"
    assert str(refused.value.naming(flag_names(command))) == "--pca-dim 80 must lie in 1..64 (the feature dimension)"
    result = tapvits("fit-gmm", "--data", "digits:split=test:classes=0,1", "--extractor", tiny_model_file, "--pca-dim", "999",
                     "-o", tmp_path / "g.safetensors")
    assert result.exit_code == 2 and "error: --pca-dim 999 must lie in 1.." in result.stderr
