"""Black-box transfer (`dvtrain.eval.blackbox`, the paper's §5 protocol) as a table of the suite: the
surrogate ensembles and example sets are its shared work (into the transfer cache), each stage's table is
scored on rank 0 with the protocol it was measured with (results.json "blackbox"[stage]), one results.md
section per protocol, the "all" accuracy per ε as numbers, and the figures of `dvtrain.eval.blackbox_plot`."""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import TYPE_CHECKING

from dvtrain.eval.report import BLACKBOX_PREFIX, blackbox_protocol, cell, counted, format_eps, model_label, stage_order
from dvtrain.eval.tables.contract import Number, Suite, Table

if TYPE_CHECKING:
    from dvtrain.eval.share import Tasks

KIND = "blackbox"
ALL_SETS = "all"  # the reference's "all" column (`dvtrain.eval.blackbox.ALL_SETS`)


class BlackboxTable(Table):
    name = "blackbox"
    section = "eval.transfer"

    def work(self, suite: Suite) -> Generator[Tasks, list, tuple | None]:
        from dvtrain.eval.blackbox import blackbox_work

        return (yield from blackbox_work(suite.run_dir, suite.cfg, suite.tcfg, suite.data, suite.device,
                                         suite.train_surrogates, suite.phases, suite.share))

    def assemble(self, suite: Suite, done: tuple, new: dict) -> dict:
        from dvtrain.eval.blackbox import blackbox_table

        sets, y, protocol = done
        out = {}
        for stage, submodels in suite.loaded.items():
            with suite.phases.phase(f"{stage} black-box transfer", len(y) * len(sets), unit="scoring",
                                    counting=f"scorings ({len(y)} images × {len(sets)} example sets)") as bar:
                # The protocol goes with the stage's table: stages evaluated apart may use other surrogates or budgets.
                out[stage] = blackbox_table(submodels, sets, y, suite.tcfg.batch_size, protocol["images"]) | {"protocol": protocol}
                bar.update(len(y) * len(sets))
        return out

    def figures(self, suite: Suite, results: dict) -> dict[str, dict[str, str]]:
        from dvtrain.eval.blackbox_plot import add_blackbox_plot

        add_blackbox_plot(suite.run_dir, results, suite.cfg.stages)  # every evaluated stage's curves; records its own paths
        return {}

    def markdown(self, results: dict) -> list[str]:
        if not results.get(self.name):
            return []
        out = _blackbox_markdown(results)
        plots = results.get("plots", {})
        first = stage_order(results[self.name])[0]
        if KIND in plots.get(first, {}):
            out += [f"![black-box transfer, all]({plots[first][KIND]})", ""]
        return out

    def numbers(self, results: dict) -> list[Number]:
        out = []
        for stage, table in results.get(self.name, {}).items():
            out += blackbox_numbers(stage, table, blackbox_protocol(results, stage))
        return out


def blackbox_numbers(stage: str, table: dict, surrogate: dict) -> list[Number]:
    """One stage's black-box numbers: "all" (correct under every example set) at each ε of the protocol's
    sweep (named bb_all_eps<ε>); a results.json written before the sweep (one ε, a column per attack) gives
    bb_<attack> at the surrogate's ε. The basis names every protocol setting that changes the number
    (surrogate sizes and epochs, the attacks and a hash of all their settings, steps, restarts, losses, sets,
    images), so runs evaluated with other
    protocols are never averaged or shown as one (issue 26, finding 4)."""
    if ALL_SETS in table:
        members = surrogate.get("surrogates", [])
        sizes = "/".join(str(e.get("size")) for e in members)
        epochs = "/".join(str(e.get("epochs")) for e in members if e.get("epochs") is not None)
        images = table.get("images") or surrogate.get("images")
        attacks = "/".join(surrogate.get("attacks") or dict.fromkeys(s["attack"] for s in table["sets"]))
        settings = f" (settings {surrogate['attack_settings']})" if surrogate.get("attack_settings") else ""
        text = (f"surrogates ×{sizes}" + (f" of {epochs} epochs" if epochs else "") + f", attacks {attacks}{settings}"
                + f", {len(table['sets'])} sets, {surrogate.get('steps')} steps, {surrogate.get('restarts')} restarts"
                + (f", losses {'/'.join(surrogate['losses'])}" if surrogate.get("losses") else "")
                + f"; n={table.get('n_images')}" + (f", images {images}" if images else ""))
        return [Number(stage, model, BLACKBOX_PREFIX + ALL_SETS, eps, table[ALL_SETS][m][k], text,
                       f"{BLACKBOX_PREFIX}{ALL_SETS}_eps{eps:g}")
                for m, model in enumerate(table["models"]) for k, eps in enumerate(table["eps"])]
    text = (f"surrogate ×{surrogate.get('size')}, {surrogate.get('steps')} steps, {surrogate.get('restarts')} "
            f"restarts; n={surrogate.get('n_images')}") if surrogate else ""
    return [Number(stage, model, BLACKBOX_PREFIX + attack, surrogate.get("eps") or None, table["accuracy"][m][a], text,
                   BLACKBOX_PREFIX + attack)
            for m, model in enumerate(table["models"]) for a, attack in enumerate(table["attacks"])]


def _protocol_identity(protocol: dict, table: dict) -> str:
    """What must agree for stages to share one black-box section: the protocol and the sets at each ε."""
    return json.dumps([protocol, table.get("eps"), table.get("sets")], sort_keys=True)


def _blackbox_markdown(results: dict) -> list[str]:
    """The black-box section(s) (`dvtrain.eval.blackbox`): one per protocol, the stages measured with it
    together, each drawn with its own ε grid and example sets (never under another stage's headers)."""
    tables = results.get("blackbox", {})
    stages = [s for s in stage_order(tables) if "all" in tables[s]]
    groups: dict[str, list[str]] = {}
    for stage in stages:
        groups.setdefault(_protocol_identity(blackbox_protocol(results, stage), tables[stage]), []).append(stage)
    out = []
    for k, members in enumerate(groups.values()):
        title = "## Black-box transfer" + (f" (protocol {k + 1} of {len(groups)}: {', '.join(members)})"
                                           if len(groups) > 1 else "")
        out += _blackbox_group_markdown(title, {s: tables[s] for s in members}, blackbox_protocol(results, members[0]))
    return out


def _attacks_text(protocol: dict) -> str:
    """The attacks a protocol ran, each with every setting its examples depend on (`attacks`, recorded since
    the attack records); an earlier results.json ran the paper's three with the protocol's own settings."""
    from dvtrain.eval.blackbox import attack_label  # the records' labels (torch: only when drawn)

    if "attacks" not in protocol:
        return (f"momentum PGD ({counted(protocol['restarts'], 'random start')}), M-DI²-FGSM (p {protocol['di_prob']:g}) "
                f"and SGM (γ {protocol['sgm_gamma']:g}), {protocol['steps']} steps each")
    hidden = ("batch_size", "code")  # alike for every attack of a protocol, or a code detail

    def settings(budget: dict) -> str:
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in budget.items() if k not in hidden)

    return "; ".join(f"{attack_label(name)} ({settings(budget)})" for name, budget in protocol["attacks"].items())


def _blackbox_group_markdown(title: str, tables: dict[str, dict], protocol: dict) -> list[str]:
    """"all" per ε for every stage and model of one protocol, then one detailed table per ε (a column per
    surrogate ensemble × attack × loss), the surrogates' own rows first."""
    from dvtrain.eval.blackbox import set_label  # the attack records' labels (torch: only when drawn)

    stages = list(tables)
    first = tables[stages[0]]
    eps_grid = first["eps"]
    sizes = ", ".join(str(s["size"]) for s in protocol.get("surrogates", []))
    described = ([f"Accuracy (%) on {protocol['n_images']} test images (seed {protocol['seed']}) under transfer examples "
                  f"crafted on hold-out plain ensembles of {sizes} models of this architecture with "
                  f"{_attacks_text(protocol)}, losses {', '.join(l.upper() for l in protocol['losses'])}"
                  + (f", surrogates trained {', '.join(str(s['epochs']) for s in protocol['surrogates'])} epochs"
                     if all("epochs" in s for s in protocol.get("surrogates", [])) else "")
                  + ". A set counts an image correct only under all its runs; \"all\": correct under every set at "
                  f"that ε. Example sets and surrogates are shared by every run on the same data ({protocol['cache']})."]
                 if protocol else ["Protocol not recorded (results.json of an earlier dvtrain)."])
    lines = [title, "", *described, "",
             *(f"- {note}" for note in protocol.get("notes", [])), *([""] if protocol.get("notes") else []),
             "| Stage | Model | " + " | ".join(f"all ε={format_eps(e)}" for e in eps_grid) + " |",
             "|---|---" + "|---:" * len(eps_grid) + "|"]
    for stage in stages:
        t = tables[stage]
        lines += [f"| {stage} | {model_label(stage, m)} | " + " | ".join(cell(v) for v in row) + " |"
                  for m, row in zip(t["models"], t["all"])]
    by_surrogate = [s for s in stages if tables[s].get("all_by_surrogate")]
    if by_surrogate:
        lines += ["", "The mixture per surrogate ensemble (correct under every set crafted on it at that ε):", "",
                  "| Stage | Surrogate | " + " | ".join(f"ε={format_eps(e)}" for e in eps_grid) + " |",
                  "|---|---" + "|---:" * len(eps_grid) + "|"]
        for stage in by_surrogate:
            t = tables[stage]
            m = t["models"].index("mixture")
            lines += [f"| {stage} | {name} | " + " | ".join(cell(v) for v in rows[m]) + " |"
                      for name, rows in t["all_by_surrogate"].items()]
    for k, eps in enumerate(eps_grid):
        columns = [j for j, s in enumerate(first["sets"]) if s["eps"] == eps]
        labels = [set_label(first["sets"][j]) for j in columns]
        lines += ["", f"### Black-box transfer at ε={format_eps(eps)}", "",
                  "| Stage | Model | " + " | ".join(labels) + " | all |", "|---|---" + "|---:" * (len(columns) + 1) + "|"]
        for sur in protocol.get("surrogates", []):
            own = {(s["surrogate"], s["attack"], s["loss"], s["eps"]): v for s, v in zip(sur["sets"], sur["own_accuracy"])}
            keys = [tuple(first["sets"][j].values()) for j in columns]
            lines.append(f"| surrogate {sur['name']} | Mixture (white-box) | " + " | ".join(
                cell(own[key]) if key in own else "" for key in keys) + " | |")
        for stage in stages:
            t = tables[stage]
            lines += [f"| {stage} | {model_label(stage, m)} | " + " | ".join(cell(acc[j]) for j in columns)
                      + f" | {cell(every[k])} |" for m, acc, every in zip(t["models"], t["accuracy"], t["all"])]
    return [*lines, ""]


TABLE = BlackboxTable()
