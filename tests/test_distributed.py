"""Several processes, for real: `examples/data_parallel.py --distributed` in two processes on
this machine equals one process on one device.

Two processes on 127.0.0.1, each with four forced CPU devices, call
`jax.distributed.initialize` (process 0 is the coordinator, on a free port) and form one
eight-device mesh whose collectives cross processes through gloo (TCP). Each feeds its half of
every batch (`jax.make_array_from_process_local_data`). They train IGBv1 + Nash-MTL with Adam
on the three paths, three ways each (data parallel under `jit`, under `shard_map`, and data x
parameter sharding under `jit`); every step's losses must equal a one-process, one-device
run's to 1e-4 (relative, float32), as on eight devices of one process (tests/test_devices.py).
Both processes are killed if they outlive their time (a process waiting on a dead peer would
wait for minutes). About 40 s of CPU time (three processes compiling 9 + 3 programs), so it
runs under `-m slow`, which `.ci/run` runs after the default suite.
"""

import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data_parallel.py"
TOLERANCE = 1e-4  # largest |distributed - one device| / |one device| over every step's losses
WAYS = ("jit, data parallel", "shard_map, data parallel", "jit, data x param")
PATHS = ("stacked", "gram", "representation")
TIMEOUT = 600  # seconds, per run (both processes together)


def environment(devices: int) -> dict[str, str]:
  """A child's environment: `devices` forced CPU devices, this checkout importable."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_device(steps: int, paths=PATHS) -> dict[str, np.ndarray]:
  """The reference: the example's one-device run, in this process (one host, whole batches)."""
  spec = importlib.util.spec_from_file_location("data_parallel", EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)  # jax is imported already: no devices are forced here
  data = example.local_batches(example.STEPS_PER_EPOCH)
  return {f"{p}|one device": example.train(p, "one device", data, steps) for p in paths}


def two_processes(tmp: pathlib.Path, steps: int, devices: int, paths=PATHS,
                  ways=WAYS) -> tuple[dict[str, np.ndarray], list[str]]:
  """Both processes of the distributed run; returns process 0's losses and both logs."""
  out, port = tmp / "distributed.npz", free_port()
  logs = [tmp / f"process_{i}.log" for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:
        procs.append(subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--distributed", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i), "--steps", str(steps),
             "--paths", *paths, "--ways", *ways, "--save", str(out)],
            cwd=ROOT, env=environment(devices), stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True))
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:  # never leave a process behind, whatever happened
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  text = [log.read_text() for log in logs]
  assert codes == [0, 0], "\n".join(t[-3000:] for t in text)
  return dict(np.load(out)), text


def compare(distributed: dict, reference: dict, paths, ways) -> dict[str, tuple[float, float]]:
  """(largest absolute, largest relative) difference of every (path, way) from one device."""
  assert set(distributed) == {f"{p}|{w}" for p in paths for w in ways}
  gaps = {}
  for key, losses in distributed.items():
    ref = reference[f"{key.split('|')[0]}|one device"]
    assert losses.shape == ref.shape
    gaps[key] = (float(np.max(np.abs(losses - ref))),
                 float(np.max(np.abs(losses - ref) / np.abs(ref))))
  return gaps


def check(tmp_path, steps, devices, paths=PATHS, ways=WAYS):
  distributed, logs = two_processes(tmp_path, steps, devices, paths, ways)
  for text in logs:  # one mesh over both processes' devices
    assert f"{2 * devices} cpu devices, 2 process(es)" in text, text[-2000:]
  gaps = compare(distributed, one_device(steps, paths), paths, ways)
  for key, (absolute, relative) in gaps.items():
    print(f"{key}: max abs diff {absolute:.2e}, max relative {relative:.2e}")
  assert max(r for _, r in gaps.values()) < TOLERANCE, gaps


@pytest.mark.slow
def test_two_processes_every_path_and_way_equal_one_device(tmp_path):
  check(tmp_path, steps=6, devices=4)
