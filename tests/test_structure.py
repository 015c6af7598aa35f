"""The architecture the code promises: stages as plug-ins whose config sections come from the registry,
a stage loop that owns the frame around a stage's step, and imports that point one way (no circle)."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from dvtrain import stages
from dvtrain.config import STAGES, Config, StageConfig

PACKAGE = Path(__file__).resolve().parent.parent / "dvtrain"
STAGE_MODULES = ("vanilla.py", "dverge.py", "baselines.py")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `from X import names` / `import X` in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """dvtrain module → the dvtrain modules it imports (a `from package import name` naming a submodule
    counts as importing that submodule)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _imports(path):
            submodules = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            edges.update(submodules)
            if module in modules and (not names or len(submodules) < len(names)):
                edges.add(module)  # (`from package import submodule` imports the submodule)
        graph[name] = edges - {name}
    return graph


def test_every_stage_is_registered_in_training_order_with_its_config_section():
    assert stages.built_in_names() == STAGES == ("vanilla", "adp", "gal", "trs", "dverge", "dverge_advt")
    cfg = Config()
    for name, spec in stages.specs().items():
        assert issubclass(spec.config, StageConfig), name
        assert isinstance(cfg.section(name), spec.config), name  # the section is named after the stage
        trainer = spec.trainer_class()
        assert trainer.name == name and trainer.main_loss.startswith("loss/")
    assert [n for n, s in stages.specs().items() if s.distils] == ["dverge", "dverge_advt"]


def test_config_has_no_field_per_stage():
    assert not set(STAGES) & set(Config.__dataclass_fields__)


def test_models_know_nothing_of_dverge_ranks_or_training():
    for path in (PACKAGE / "models").glob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("dvtrain.train", "dvtrain.distributed", "dvtrain.eval")), (path, module)


def test_the_core_and_evaluation_do_not_import_training_code():
    core = [p for p in PACKAGE.glob("*.py") if p.name != "cli.py"]
    for path in core + list((PACKAGE / "distributed").glob("*.py")) + list((PACKAGE / "eval").rglob("*.py")):
        for module, _ in _imports(path):
            assert not module.startswith("dvtrain.train"), (path.name, module)


def test_no_import_circle_in_the_package():
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, " -> ".join(trail[trail.index(nxt):] + [nxt] if nxt in trail else trail + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_below_the_package_imports_the_package_itself():
    for path in PACKAGE.rglob("*.py"):
        if path.parent != PACKAGE:
            assert ("dvtrain", []) not in _imports(path), path


def test_stage_modules_hold_their_method_and_nothing_of_the_frame():
    """Skipping on resume, replica sharding and the optimizers' zero/backward/step are the loop's
    (dvtrain.train.frame); a stage module computes its batches and its loss."""
    frame = re.compile(r"zero_grad|\.backward\(|optimizers\[[^]]*\]\.step\(|\.shard\(|\bskip\b|step < ")
    for name in STAGE_MODULES:
        for number, line in enumerate((PACKAGE / "train" / name).read_text().splitlines(), start=1):
            assert not frame.search(line.split("#")[0]), f"{name}:{number}: {line.strip()}"


def test_stage_sections_are_read_through_the_config_not_getattr():
    pattern = re.compile(r"getattr\(\s*(self\.|ctx\.|run\.)*cfg\s*,")
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("config.py", "stages.py"):
            continue
        assert not pattern.search(path.read_text()), path


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
    nothing of evaluation but its renderers (the headline among them), figure style, the white-box attack records
    (plain data) and the table registry (whose records import
    their attack code only when they run). Also at run time: reading every table's numbers and markdown
    loads no torch."""
    for path in (PACKAGE / "report").glob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("torch", "dvtrain.train")), (path.name, module)
            assert not module.startswith("dvtrain.eval") or module in (
                "dvtrain.eval.report", "dvtrain.eval.plots", "dvtrain.eval.tables", "dvtrain.eval.headline",
                "dvtrain.eval.attacks.registry"), (path.name, module)
    probe = ("import sys; import dvtrain.report.compare; from dvtrain.eval.tables import registry; "
             "tables = registry.tables(); [t.numbers({}) for t in tables]; "
             "print(len(tables), 'torch' in sys.modules, 'matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0, done.stderr
    count, torch_loaded, matplotlib_loaded = done.stdout.split()
    assert int(count) >= 6 and torch_loaded == "False" and matplotlib_loaded == "False", done.stdout


def test_no_table_imports_another():
    """Each table of `dvtrain eval` is one record behind the contract (dvtrain/eval/tables/contract.py): a
    table module imports the contract, never another table (it reads their entries in `assemble`)."""
    folder = PACKAGE / "eval" / "tables"
    table_modules = {_module(p) for p in folder.glob("*.py")} - {
        "dvtrain.eval.tables", "dvtrain.eval.tables.contract", "dvtrain.eval.tables.registry"}
    assert {m.rsplit(".", 1)[1] for m in table_modules} >= {"whitebox", "transfer", "blackbox", "sweep", "diversity", "checks"}
    for path in folder.glob("*.py"):
        if _module(path) not in table_modules:
            continue
        for module, names in _imports(path):
            imported = {module} | {f"{module}.{n}" for n in names}
            assert not imported & (table_modules - {_module(path)}), (path.name, module)
            assert module != "dvtrain.eval.tables.registry", (path.name, "a table does not look others up")


def test_a_gather_appears_only_in_eval_share():
    """Evaluation shares work one way: collectives live in dvtrain/eval/share.py alone."""
    for path in (PACKAGE / "eval").rglob("*.py"):
        if path.name == "share.py":
            continue
        text = path.read_text()
        for collective in ("torch.distributed", "all_gather_object", "dist.all_gather", "broadcast_object_list",
                           "share.gather(", ".gather(mine)"):
            assert collective not in text, (path.name, collective)


def test_the_store_validates_every_built_in_table_s_section():
    """dvtrain/results.py (core: it imports no evaluation) validates the per-stage sections by name; they are
    the built-in tables' (a plug-in table's section is stored and read back, not validated)."""
    from dvtrain import results
    from dvtrain.eval.tables import registry

    built_in = [registry.tables()[k].name for k in range(len(registry.BUILT_IN))]
    assert set(results.STAGE_SECTIONS) == {*built_in, "plots"} - {results.ROWS}


def test_every_attack_of_evaluation_lives_in_eval_attacks():
    """Issue 26: one home for attacks. Every attack record (`WhiteboxAttack(`, `TransferAttack(`) and every
    import of attack code (pyautoattack, the ensemble attack, the transfer attacks' update) in dvtrain/eval/
    is in dvtrain/eval/attacks/; the rest of evaluation reaches attacks through the records."""
    home = PACKAGE / "eval" / "attacks"
    assert {p.stem for p in home.glob("*.py")} >= {"registry", "transfer", "adaptive", "autoattack", "mi_fgsm"}
    attack_code = {"pyautoattack", "dvtrain.eval.attacks.adaptive", "dvtrain.eval.attacks.autoattack",
                   "dvtrain.eval.attacks.mi_fgsm"}
    tools = {"ensemble_attack_check.py"}  # a command-line tool that runs the attacks side by side on purpose
    for path in (PACKAGE / "eval").rglob("*.py"):
        if home in path.parents or path.name in tools:
            continue
        text = path.read_text()
        assert not re.search(r"\b(WhiteboxAttack|TransferAttack)\(", text), path.name
        imported = {module for module, _ in _imports(path)}
        assert not imported & attack_code, (path.name, imported & attack_code)
    old_homes = {"attack_registry.py", "adaptive.py", "autoattack.py", "transfer_attacks.py"}
    assert not {p.name for p in (PACKAGE / "eval").glob("*.py")} & old_homes
