"""loadtest.model_analyzer: the Model Analyzer run set up for the bundled server, its results read back, the
best settings turned into sweep variants the sweep accepts (Model Analyzer itself runs in `make model-analyzer`)."""

import subprocess

import yaml
from google.protobuf import text_format

from ctr_ensemble.export.repository import RepoOptions, member_config
from ctr_ensemble.loadtest import model_analyzer as ma
from ctr_ensemble.loadtest.sweep import load_sweep


def test_prepare_writes_a_local_cpu_search_with_exec_wrappers(tiny_repo, tmp_path):
    perf_bin = tmp_path / "perf_analyzer"
    perf_bin.write_text("#!/bin/sh\necho \"$@\"\n")
    perf_bin.chmod(0o755)
    config = ma.prepare(tiny_repo, "deepfm", tmp_path / "input.json", tmp_path / "work", perf_bin, ma._search_config())
    cfg = yaml.safe_load(config.read_text())
    assert cfg["triton_launch_mode"] == "local" and cfg["profile_models"]["deepfm"]["cpu_only"] is True
    assert cfg["perf_analyzer_flags"]["input-data"] == str(tmp_path / "input.json")
    search = cfg["profile_models"]["deepfm"]["model_config_parameters"]
    assert search["instance_group"][0]["count"] == ma.SEARCH["instances"]
    assert search["dynamic_batching"]["preferred_batch_size"] == ma.SEARCH["preferred_batch_sizes"]
    assert all(cfg["triton_server_flags"][f"{k}-address"] == "127.0.0.1" for k in ("http", "grpc", "metrics"))
    assert sorted(p.name for p in (tmp_path / "work" / "repo").iterdir()) == ["deepfm"]  # the member alone
    server = (tmp_path / "work" / "tritonserver.sh").read_text()
    assert "exec " in server and "--backend-directory=" in server  # exec: Model Analyzer signals the process it started
    out = subprocess.run([str(tmp_path / "work" / "perf_analyzer.sh"), "-m", "deepfm"], capture_output=True, text=True)
    assert out.stdout.strip() == "-m deepfm"  # arguments pass through the wrapper unchanged


def _fake_run(work, member, spec, rows):
    """What a finished Model Analyzer run leaves: its configs in output_repo, its measurements as CSV."""
    (work / "results" / "results").mkdir(parents=True)
    for name, opt in (("deepfm_config_default", RepoOptions()), ("deepfm_config_0", RepoOptions(instances=2)),
                      ("deepfm_config_1", RepoOptions(max_queue_delay_us=200, preferred_batch_sizes=[64]))):
        d = work / "output_repo" / name
        d.mkdir(parents=True)
        (d / "config.pbtxt").write_text(text_format.MessageToString(member_config(member, spec, 8, opt)))
    head = "Model,Batch,Concurrency,Model Config Path,Instance Group,Max Batch Size,Satisfies Constraints,Throughput (infer/sec),p99 Latency (ms)\n"
    (work / "results" / "results" / "metrics-model-inference.csv").write_text(head + "".join(
        f"{member},{b},{c},{cfg},1:CPU,1024,Yes,{t},{p}\n" for cfg, b, c, t, p in rows))


def test_results_are_read_with_their_settings_and_become_sweep_variants(tiny_spec, tmp_path):
    work = tmp_path / "work"
    _fake_run(work, "deepfm", tiny_spec, [("deepfm_config_default", 64, 4, 30000.0, 12.0), ("deepfm_config_0", 64, 2, 46000.0, 7.0),
                               ("deepfm_config_1", 64, 4, 41000.0, 13.0), ("deepfm_config_default", 1, 1, 800.0, 3.1),
                               ("deepfm_config_1", 1, 1, 600.0, 2.9), ("deepfm_config_0", 1, 1, 700.0, 3.5)])
    rows = ma.read_results(work, "deepfm")
    by = {(r.config, r.batch, r.concurrency): r for r in rows}
    assert by["deepfm_config_0", 64, 2].instances == 2
    assert by["deepfm_config_1", 1, 1].settings() == {"instances": 1, "max_queue_delay_us": 200, "preferred_batch_sizes": [64]}
    picks = ma.best(rows)
    assert picks["throughput"].config == "deepfm_config_0" and picks["latency"].config == "deepfm_config_1"
    variants = ma.sweep_variants({"deepfm": picks, "dcnv2": {"throughput": picks["throughput"]}}, {"tau": 1.0})
    assert [v["name"] for v in variants] == ["ma_throughput_2inst_0us_prefnone", "ma_latency_1inst_200us_pref64"]  # no repeat
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"variants": variants, "users": [1]}))
    cfg = load_sweep(path)
    assert cfg.variants[1].options["preferred_batch_sizes"] == [64]
