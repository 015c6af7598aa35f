"""What a W&B user finds: one group per run directory, readable keys, epoch axes, the final table,
and the provenance of every result (also in results.json)."""

from __future__ import annotations

import json
import subprocess

import torch

import dvtrain
from conftest import REPO
from dvtrain.report.wandb_reader import offline_run_info, read_offline_run
from dvtrain.eval.report import metric_name


def _offline_runs(run_dir):
    return [read_offline_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def test_each_run_directory_is_its_own_wandb_group(seed_runs):
    found = sorted((info.group, info.name, info.job_type)
                   for run in seed_runs.values() for info in map(offline_run_info, _offline_runs(run)))
    assert found == [("seed0", "seed0-vanilla", "vanilla"), ("seed1", "seed1-vanilla", "vanilla")]


def test_keys_epoch_axis_final_table_and_provenance(seed_runs):
    run_dir = seed_runs["seed0"]
    (records,) = _offline_runs(run_dir)
    info = offline_run_info(records)
    logged = {k for r in records if r["type"] == "history" for k in r["history"]["item"] if not k.startswith("_")}
    assert {"train/loss/clean/sub0", "train/acc/sub2", "train/lr", "test/acc/sub1", "test/acc/mixture",
            "test/loss/mixture", "epoch"} <= logged
    assert all(k.split("/")[0] in ("train", "test", "epoch", "eval") for k in logged), logged
    by_epoch = {r["metric"]["name"] for r in records if r["type"] == "metric" and r["metric"].get("step_metric") == "epoch"}
    assert {"test/acc/mixture", "test/loss/mixture", "train/lr"} <= by_epoch and "train/loss/clean/sub0" not in by_epoch

    results = json.loads((run_dir / "results.json").read_text())
    for row in results["eval"]:
        metric = metric_name(row["attack"], row["norm"])
        assert info.summary[f"eval/{metric}/{row['model']}"] == row["accuracy"]
        assert info.summary[f"eval/{metric}/eps"] == row["eps"]
    assert info.summary["eval/table._type"] == "table-file"
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    table = json.loads((offline / "files" / info.summary["eval/table.path"]).read_text())
    assert len(table["data"]) == len(results["eval"]) and "accuracy" in table["columns"]

    prov = results["provenance"]
    assert prov["dvtrain"] == dvtrain.__version__ and prov["torch"] == torch.__version__
    assert prov["world_size"] == 1 and prov["threads_per_process"] >= 1 and prov["precision"] == "fp32"
    assert prov["engine"]["dverge"] in ("loop", "grouped") and prov["stage_wall_s"]["vanilla"] > 0
    assert prov["started"] <= prov["ended"]
    # the CPU model and torch's vector unit: weights differ between CPUs, so a figure names its CPU
    assert prov["cpu"].endswith(str(torch.backends.cpu.get_cpu_capability())) and len(prov["cpu"]) > len("AVX2, ")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["git_commit"].startswith(head.stdout.strip())
    assert info.config["provenance"] == prov  # the W&B config carries the same


def test_final_checkpoint_is_an_artifact_when_asked(seed_runs):
    def artifacts(run_dir):
        (records,) = _offline_runs(run_dir)
        return [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "model"]

    assert artifacts(seed_runs["seed0"]) == []  # logging.artifacts=false (default)
    (artifact,) = artifacts(seed_runs["seed1"])
    assert artifact["name"] == "seed1-vanilla"
    files = {entry["path"] for entry in artifact["manifest"]["contents"]}
    assert {"sub0.safetensors", "sub2.safetensors", "state.json"} <= files
