"""benchmarks/cpu_suite.py off Linux: its peak-RSS, CPU-model and load-average helpers on Linux, macOS and
Windows (faked: sys.platform, unreadable /proc files, a fake resource.getrusage / psutil); and the packing and
carried-state benchmarks' --quick runs (a tiny model, to check the scripts, not for numbers)."""

from __future__ import annotations

import builtins
import importlib.util
import sys
import types
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    """benchmarks/cpu_suite.py as a module (benchmarks/ is not a package); sys.path is restored after."""
    saved = list(sys.path)
    name = "cpu_suite_under_test"
    spec = importlib.util.spec_from_file_location(name, SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    yield module
    sys.modules.pop(name, None)


@pytest.fixture
def no_proc(monkeypatch, suite, tmp_path):
    """No /proc: the helpers' paths point nowhere, and open() of any /proc path fails as it does on macOS
    and Windows."""
    monkeypatch.setattr(suite, "PROC_STATUS", tmp_path / "missing-status", raising=False)
    monkeypatch.setattr(suite, "PROC_CPUINFO", tmp_path / "missing-cpuinfo", raising=False)
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def fake_resource(monkeypatch, maxrss: int) -> None:
    import resource

    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))


def test_peak_rss_linux_reads_vmhwm(monkeypatch, suite, tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  999999 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(suite, "PROC_STATUS", status)
    assert suite.peak_rss_bytes() == 123456 * 1024


@pytest.mark.skipif(sys.platform == "win32", reason="needs the resource module")
def test_peak_rss_linux_without_proc_uses_getrusage_kilobytes(monkeypatch, suite, no_proc):
    monkeypatch.setattr(sys, "platform", "linux")
    fake_resource(monkeypatch, 2048)  # kilobytes on Linux
    assert suite.peak_rss_bytes() == 2048 * 1024


@pytest.mark.skipif(sys.platform == "win32", reason="needs the resource module")
def test_peak_rss_macos_getrusage_is_bytes(monkeypatch, suite, no_proc):
    monkeypatch.setattr(sys, "platform", "darwin")
    fake_resource(monkeypatch, 5_368_709_120)  # bytes on macOS: 5 GiB
    assert suite.peak_rss_bytes() == 5_368_709_120


def test_peak_rss_windows_uses_psutil_peak_working_set(monkeypatch, suite, no_proc):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError, as on Windows
    info = types.SimpleNamespace(rss=1, peak_wset=777_000_000)
    fake_psutil = types.SimpleNamespace(Process=lambda *a: types.SimpleNamespace(memory_info=lambda: info))
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil)
    assert suite.peak_rss_bytes() == 777_000_000


def test_peak_rss_windows_without_psutil_is_none(monkeypatch, suite, no_proc):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "resource", None)
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert suite.peak_rss_bytes() is None


def test_cpu_model_linux_reads_cpuinfo(monkeypatch, suite, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(suite, "PROC_CPUINFO", cpuinfo)
    assert suite.cpu_model() == "AMD EPYC 7B13"


def test_cpu_model_macos_uses_sysctl_then_platform(monkeypatch, suite, no_proc):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(suite, "_sysctl", lambda name: "Apple M2" if name == "machdep.cpu.brand_string" else None)
    assert suite.cpu_model() == "Apple M2"
    monkeypatch.setattr(suite, "_sysctl", lambda name: None)
    monkeypatch.setattr(suite.platform, "processor", lambda: "arm")
    assert suite.cpu_model() == "arm"


@pytest.mark.parametrize("plat", ["darwin", "win32"])
def test_machine_description_off_linux(monkeypatch, suite, no_proc, plat):
    """Off Linux (no /proc; on Windows no os.getloadavg) the description is built, and the report's header
    lines render with what is missing shown as n/a."""
    import torch  # noqa: F401 - machine_description imports these: import them before faking the platform
    import transformers  # noqa: F401

    monkeypatch.setattr(sys, "platform", plat)
    monkeypatch.setattr(suite, "_sysctl", lambda name: None, raising=False)  # (no sysctl run by the test)
    monkeypatch.setattr(suite.platform, "processor", lambda: "Intel64 Family 6 Model 158, GenuineIntel")
    if plat == "win32":
        monkeypatch.delattr(suite.os, "getloadavg", raising=False)
    d = suite.machine_description(types.SimpleNamespace(threads=2))
    assert d["cpu"] == "Intel64 Family 6 Model 158, GenuineIntel"
    assert d["logical_cores"] == suite.os.cpu_count()
    if plat == "win32":
        assert d["load_average_start"] is None
        assert suite.format_load(d["load_average_start"]) == "n/a"
    else:
        assert len(d["load_average_start"]) == 3


def test_report_header_and_train_rss_without_peak_rss(suite):
    """A run where no peak RSS could be measured (None) renders its tables and goals without crashing."""
    s = suite.QUICK
    rec = {"kind": "result", "what": "train", "dtype": "fp32", "batch": 1, "size": s.train_lengths[0],
           "status": "ok", "value": 10.0, "unit": "tok/s", "seconds": 1.0, "flops_per_token": 1e6,
           "params_total": 1_000_000, "peak_rss": None}
    results = [{**rec, "peer": "xlstm_hf"}, {**rec, "peer": "gpt2"}]
    profiles = [{"kind": "profile", "peer": p, "title": p, "notes": [], "params_total": 1_000_000,
                 "params_read_per_token": 1_000_000} for p in ("xlstm_hf", "gpt2")]
    data = {"started": "now", "duration_s": 60.0, "results": results + profiles,
            "machine": {"cpu": "unknown", "logical_cores": None, "threads": 2, "versions": {},
                        "load_average_start": None, "load_average_end": None},
            "args": {"quick": True, "peers": ["xlstm_hf", "gpt2"], "what": ["train"], "batches": [1],
                     "dtypes": ["fp32"], "threads": 2}}
    text = suite.Report(data, s).markdown()
    assert "load average at start / end: n/a / n/a" in text
    group = suite.Group("xlstm_hf", ("train",), "fp32", (8,), [("train", 8, s.train_lengths[0])])
    assert suite.train_prediction(group, results, s) is None


def _run_script(name, tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    result = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return (tmp_path / name.replace(".py", ".md")).read_text()


def test_packing_benchmark_runs(tmp_path):
    """benchmarks/packing.py --quick (a tiny model, a few steps): every batching trains on the same pieces and the
    report has its rows (the ratios of a run this small mean nothing)."""
    report = _run_script("packing.py", tmp_path)
    for row in ("| padded |", "| packed |", "| flattened |", "Resets that are not there cost nothing"):
        assert row in report


@pytest.mark.slow
def test_carry_state_benchmark_runs(tmp_path):
    report = _run_script("carry_state.py", tmp_path)
    assert "| 0-128 |" in report and "carry state" in report


@pytest.mark.slow
def test_export_decode_benchmark_runs(tmp_path):
    """benchmarks/export_decode.py --quick: the three runtimes decode the same greedy tokens (the script fails
    otherwise) and the report has their rows."""
    report = _run_script("export_decode.py", tmp_path)
    for row in ("| eager |", "| compiled |", "| onnxruntime |"):
        assert row in report
