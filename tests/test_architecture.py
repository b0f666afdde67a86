"""The package layout holds: imports only go down the layers, no import cycle, no stage imports
another stage, dvc.yaml's code deps are exactly what each stage runs, stage outputs are
defined once, and `blipdiff <stage> --help` imports no model code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from components.core import paths
from components.stages import STAGES, runner
from tests.helpers.imports import REPO, build, find_cycle

# Lower number = lower layer; a module imports only from lower layers or from its own package.
LAYERS = {
    "components.core": 0,  # config, errors, io, paths, tracking
    "components.cluster": 1,  # Dask clusters: the context stage, evaluate's generation, blipdiff batch
    "components.data": 1,  # images, manifests, sources
    "components.model": 2,  # networks, bundle, presets, released layout
    "components.context": 3,  # CLIPSeg, matting
    "components.training": 3,  # training loop, fine-tuning
    "components.evaluation": 3,  # DreamBench protocol, evaluators, metrics, report
    "components.export": 3,  # ONNX graphs and their parity, TensorRT engines
    "serving": 4,  # batch serving: the model's sampler on torch, ONNX Runtime or TensorRT (uses export)
    "components.stages": 4,  # one module per DVC stage
    "components.cli": 5,  # the application
    "flows": 5,
}


def _group(module: str) -> str | None:
    matches = [g for g in LAYERS if module == g or module.startswith(g + ".")]
    return max(matches, key=len) if matches else None


@pytest.fixture(scope="module")
def imports():
    return build()


def test_every_module_belongs_to_a_layer(imports):
    loose = [m for m in imports.files if _group(m) is None and m != "components"]
    assert not loose, f"modules outside every layer: {loose}; put them in a subpackage of LAYERS"


def test_no_import_cycle(imports):
    cycle = find_cycle(imports)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_only_go_down(imports):
    wrong = []
    for module, edges in imports.edges.items():
        here = _group(module)
        for edge in edges:
            there = _group(edge.target)
            if there is None or there == here:
                continue
            if LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{imports.files[module].relative_to(REPO)}:{edge.line} {module} -> {edge.target}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_no_stage_imports_another(imports):
    stages = {f"components.stages.{s}" for s in STAGES}
    wrong = [f"{m} -> {e.target}" for m in stages for e in imports.edges[m]
             if e.target.startswith("components.stages.")]
    assert not wrong, wrong


def test_the_walker_sees_function_level_imports_and_cycles(tmp_path):
    """The checks above could pass by missing imports: show that they find a hidden cycle."""
    pkg = tmp_path / "components"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from components.a import y\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from components.a.x import g\n")
    for other in ("serving", "flows"):
        (tmp_path / other).mkdir()
    found = build(tmp_path)
    assert [e.module_level for e in found.edges["components.a.y"]] == [False]
    assert find_cycle(found) in (["components.a.x", "components.a.y", "components.a.x"],
                                 ["components.a.y", "components.a.x", "components.a.y"])


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _expand(deps: list[str]) -> set[str]:
    files = set()
    for dep in deps:
        path = REPO / dep
        if path.is_dir():
            files |= {p.relative_to(REPO).as_posix() for p in path.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts and p.read_bytes().strip()}
        elif path.suffix == ".py":
            files.add(dep)
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_code_deps_are_what_the_stage_runs(imports, stage):
    """`blipdiff <stage>` runs the CLI entry (module level), the runner and the stage module,
    and everything they import, at module level or inside a function. That set, less empty
    __init__ files, must be the stage's code deps: a missing one would not re-run the stage
    when it changes, an extra one would re-run it for nothing."""
    modules = (imports.closure("components.cli", module_level_only=True)
               | imports.closure("components.stages.runner")
               | imports.closure(f"components.stages.{stage}"))
    runs = {imports.files[m].relative_to(REPO).as_posix() for m in modules
            if imports.files[m].read_text().strip()}
    listed = _expand([d for d in _dvc()[stage]["deps"] if d.startswith("components/")])
    package_data = {f for f in listed if not f.endswith(".py")
                    and any(f.rsplit("/", 1)[0] == r.rsplit("/", 1)[0] for r in runs)}
    assert runs - listed == set(), f"{stage}: add these deps to dvc.yaml"
    assert listed - runs - package_data == set(), f"{stage}: these deps are never run; drop them from dvc.yaml"


def test_stage_list_agrees_with_dvc_yaml():
    assert list(_dvc()) == list(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_outputs_params_and_metrics_defined_once(stage):
    """dvc.yaml's outs, params, metrics and plots of a stage are the ones its module declares."""
    module = runner.stage_module(stage)
    spec = _dvc()[stage]
    assert spec["cmd"] == f"blipdiff {stage}"
    assert [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"]] == [p.as_posix() for p in module.OUTPUTS]
    assert spec["params"] == list(module.SECTIONS)
    # metrics and curves: small, machine-independent, committed to git for `dvc metrics/plots diff`
    assert spec["metrics"] == [{paths.metrics_file(stage).as_posix(): {"cache": False}}]
    assert spec.get("plots", []) == [{p.as_posix(): {"cache": False}} for p in getattr(module, "PLOTS", ())]


def test_stage_help_imports_no_model_code():
    code = ("import sys\nfrom components.cli import main\n"
            "try:\n    main(['ingest', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'mlflow', 'pandas', 'numpy')"
            " if m in sys.modules)\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--set KEY=VALUE" in out
    assert out.strip().splitlines()[-1] == "HEAVY []"


def test_generate_help_still_lists_its_options():
    out = subprocess.run([sys.executable, "-m", "components.cli", "generate", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "--subject-image" in out and "--scheduler" in out
