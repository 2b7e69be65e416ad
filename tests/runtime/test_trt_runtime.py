"""The TensorRT runtime path without torch: optimization profiles per batch, profile choice, and the
backend's buffers/streams/events through cuda-python, checked against stand-ins that compute (see
trt_fakes) and, for the error paths, against this machine's real cuda-python."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from runtime.backends import trt as trt_backend
from runtime.backends.trt_cuda import Cuda, CudaError, DeviceBuffer
from runtime.errors import RuntimeStageError
from trt_fakes import FakeCudart, FakeEngine, fake_tensorrt

PROFILES = [(1, 1, 32), (1, 8, 32), (1, 32, 32)]


# ---------------------------------------------------------------- profiles

def test_one_profile_per_opt_batch_over_the_whole_range():
    assert trt_backend.batch_profiles(1, (32, 1, 8, 8), 32) == PROFILES
    assert trt_backend.batch_profiles(2, "4,16", 64) == [(2, 4, 64), (2, 16, 64)]
    assert trt_backend.opt_batch_list(8) == (8,)
    for bad in ((0, (1,), 4), (2, (1, 4), 4), (1, (8,), 4)):
        with pytest.raises(RuntimeStageError, match="every opt batch"):
            trt_backend.batch_profiles(*bad)
    with pytest.raises(RuntimeStageError, match="integers"):
        trt_backend.opt_batch_list("1,x")


@pytest.mark.parametrize("batch,opt", [(1, 1), (8, 8), (32, 32), (2, 8), (9, 32), (5, 8)])
def test_each_batch_runs_on_the_profile_tuned_for_it_or_the_next_larger(batch, opt):
    assert PROFILES[trt_backend.pick_profile(PROFILES, batch)][1] == opt


def test_profile_choice_outside_and_at_the_edges():
    assert trt_backend.pick_profile([(1, 4, 16)], 16) == 0            # above every opt: the largest
    assert trt_backend.pick_profile([(1, 2, 8), (4, 16, 32)], 12) == 1  # only the second holds 12
    assert trt_backend.pick_profile([(1, 2, 8), (1, 4, 8)], 8) == 1
    with pytest.raises(RuntimeStageError, match="outside the engine's profiles .*--max-batch 33"):
        trt_backend.pick_profile(PROFILES, 33)


def test_builder_gets_one_profile_per_opt_batch_in_order():
    calls = []

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append((name, lo, opt, hi))

    class Builder:
        def create_optimization_profile(self):
            return Profile()

    class Config:
        added = 0

        def add_optimization_profile(self, p):
            Config.added += 1
            return Config.added - 1

    trt_backend.add_profiles(Builder(), Config(), "input", (3, 32, 32), PROFILES)
    assert calls == [("input", (1, 3, 32, 32), (b, 3, 32, 32), (32, 3, 32, 32)) for b in (1, 8, 32)]
    assert trt_backend.profile_info(PROFILES[:1], (3, 32, 32)) == [
        {"index": 0, "min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [32, 3, 32, 32]}]

    class Refusing(Config):
        def add_optimization_profile(self, p):
            return -1

    with pytest.raises(RuntimeStageError, match="refused the optimization profile 1/8/32"):
        trt_backend.add_profiles(Builder(), Refusing(), "input", (3, 4, 4), PROFILES[1:])


# ---------------------------------------------------------------- CUDA through cuda-python

def test_cuda_errors_are_one_line_naming_the_call():
    cuda = Cuda(FakeCudart())
    with pytest.raises(CudaError, match=r"^cudaFree failed: cudaErrorInvalidValue$"):
        cuda.free(12345)
    with pytest.raises(CudaError, match=r"cudaSetDevice\(3\) failed"):
        cuda.set_device(3)
    assert cuda.runtime_version() == "12.6"
    assert cuda.device_properties(0) == {"name": "Fake GPU", "compute_capability": "8.7", "memory_bytes": 8 << 30}


def test_device_buffer_grows_never_shrinks_and_frees():
    rt = FakeCudart()
    buf = DeviceBuffer(Cuda(rt))
    a = buf.ensure(100)
    assert buf.ensure(50) == a and rt.memory[a].size == 100
    b = buf.ensure(200)
    assert b != a and rt.freed == [a] and rt.memory[b].size == 200
    buf.free()
    assert rt.memory == {} and buf.ptr == 0


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python is not installed")
def test_real_cuda_python_without_a_gpu_is_one_line():
    """On this machine's cuda-python: a missing driver or GPU is TensorRTUnavailable in one line."""
    cuda = Cuda()
    try:
        count = cuda.device_count()
    except CudaError as e:
        msg = str(e)
        assert msg.startswith("cudaGetDeviceCount failed: cudaError") and "\n" not in msg
        with pytest.raises(trt_backend.TensorRTUnavailable, match="no CUDA GPU visible"):
            trt_backend.require_cuda()
        return
    if count == 0:
        with pytest.raises(trt_backend.TensorRTUnavailable):
            trt_backend.require_cuda()
    else:
        assert trt_backend.require_cuda().device_count() == count


def test_backend_module_does_not_import_torch_or_tensorrt():
    code = ("import sys, runtime.backends.trt, runtime.backends.trt_cuda, runtime.engine; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'cuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the backend on stand-ins

@pytest.fixture
def fake_backend(tmp_path, monkeypatch):
    """A TrtBackend over a fake engine file; returns (backend, cudart, engine)."""
    rt = FakeCudart()
    made = {"options": {}}

    def factory(data):
        made["engine"] = FakeEngine(rt, PROFILES, **made["options"])
        return made["engine"]

    monkeypatch.setattr(trt_backend, "require_tensorrt", lambda: fake_tensorrt(factory))
    path = tmp_path / "model.int8.engine"
    path.write_bytes(b"FAKEPLAN" + bytes(100))
    be = trt_backend.TrtBackend(path, cuda=Cuda(rt))
    be.made = made
    return be, rt, made["engine"]


def test_backend_runs_each_batch_on_its_profile_and_returns_the_engines_numbers(fake_backend):
    be, rt, engine = fake_backend
    assert be.profiles == PROFILES and be.batch_range == (1, 32) and be.precision == "int8"
    x = np.random.default_rng(0).standard_normal((45, 3, 4, 4)).astype(np.float32)
    for n in (1, 8, 5):
        np.testing.assert_allclose(be.run(x[:n]), engine.expected(x[:n]), rtol=1e-6)
    y = be.run(x)                                          # 45 > 32: chunks of 32 and 13
    assert y.shape == (45, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, engine.expected(x), rtol=1e-6)
    runs = [r for c in engine.contexts for r in c.runs]
    opt = {n: PROFILES[p][1] for p, n in runs}
    assert opt == {1: 1, 8: 8, 5: 8, 32: 32, 13: 32}        # every batch on the profile tuned for it
    assert len(engine.contexts) == 3 and sorted(c.profile for c in engine.contexts) == [0, 1, 2]
    assert be.describe()["profile_opt_by_batch"] == {"1": 1, "5": 8, "8": 8, "13": 32, "32": 32}
    assert be.describe()["gpu"] == "Fake GPU"


def test_backend_times_with_cuda_events_and_frees_everything(fake_backend):
    be, rt, engine = fake_backend
    x = np.ones((8, 3, 4, 4), np.float32)
    # the fake engine advances the stream clock by 0.25 ms per image: events read exactly that
    assert be.time_runs(x, n=3) == [pytest.approx(8 * 0.25e-3)] * 3
    out, ms = be.timed_run(x[:2])
    assert ms == pytest.approx(0.5)
    np.testing.assert_allclose(out, engine.expected(x[:2]), rtol=1e-6)
    assert rt.events == {}                                 # every event destroyed after reading
    assert be.memory()["file_bytes"] == 108
    be.close()
    assert rt.memory == {} and rt.streams == set()


def test_backend_refuses_what_it_cannot_run(fake_backend, tmp_path, monkeypatch):
    be, rt, engine = fake_backend
    be.made["options"]["output_dtype"] = type(engine.output_dtype).BF16
    with pytest.raises(RuntimeStageError, match="tensor type BF16 is not supported"):
        trt_backend.TrtBackend(be.path, cuda=Cuda(rt))
    bad = tmp_path / "x.engine"
    bad.write_bytes(b"not a plan")
    with pytest.raises(RuntimeStageError, match="cannot load TensorRT engine x.engine"):
        trt_backend.TrtBackend(bad, cuda=Cuda(rt))
