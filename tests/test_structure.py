"""The architecture the code promises: stages as plug-ins named after their config sections, and
imports that point one way."""

import ast
import dataclasses
from pathlib import Path

from dvtrain.config import STAGES, Config
from dvtrain.train.registry import REGISTRY

PACKAGE = Path(__file__).resolve().parent.parent / "dvtrain"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `from X import names` / `import X` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def test_every_stage_is_registered_in_training_order_with_its_config_section():
    assert tuple(REGISTRY) == STAGES
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name, stage in REGISTRY.items():
        assert stage.name == name
        assert isinstance(getattr(Config(), name), stage.config), name  # the section is named after the stage
        assert name in sections and stage.main_loss.startswith("loss/")


def test_models_know_nothing_of_dverge_ranks_or_training():
    for path in (PACKAGE / "models").glob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("dvtrain.train", "dvtrain.distributed", "dvtrain.eval")), (path, module)


def test_the_core_does_not_import_training_code():
    core = [p for p in PACKAGE.glob("*.py") if p.name not in ("cli.py", "bench.py")]
    for path in core + list((PACKAGE / "distributed").glob("*.py")):
        for module, _ in _imports(path):
            assert not module.startswith("dvtrain.train"), (path.name, module)


def test_evaluation_imports_no_training_code():
    """Issue 26: `dvtrain eval` is handed its surrogate trainer by the CLI; no module of dvtrain/eval/
    imports dvtrain.train (directly; nor does the results store or the digest it uses)."""
    for path in [*(PACKAGE / "eval").rglob("*.py"), PACKAGE / "results.py", PACKAGE / "digest.py"]:
        for module, _ in _imports(path):
            assert not module.startswith("dvtrain.train"), (path.relative_to(PACKAGE), module)


def test_the_results_store_imports_no_torch_and_nothing_of_evaluation():
    """dvtrain.results is core: `dvtrain compare` reads through it without loading torch."""
    for module, _ in _imports(PACKAGE / "results.py"):
        assert not module.startswith(("torch", "dvtrain.eval", "dvtrain.train")), module


def test_reporting_imports_no_torch_and_no_training():
    """dvtrain/report/ (compare, the offline W&B reader) computes nothing: no torch, no training code, and
    nothing of evaluation but its renderers and figure style (dvtrain.eval.report, dvtrain.eval.plots)."""
    for path in (PACKAGE / "report").glob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("torch", "dvtrain.train")), (path.name, module)
            assert not module.startswith("dvtrain.eval") or module in ("dvtrain.eval.report", "dvtrain.eval.plots"), (
                path.name, module)


def test_a_gather_appears_only_in_eval_share():
    """Evaluation shares work one way: collectives live in dvtrain/eval/share.py alone."""
    for path in (PACKAGE / "eval").rglob("*.py"):
        if path.name == "share.py":
            continue
        text = path.read_text()
        for collective in ("torch.distributed", "all_gather_object", "dist.all_gather", "broadcast_object_list"):
            assert collective not in text, (path.name, collective)
