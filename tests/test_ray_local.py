"""The local Ray that `fedcam simulate` starts: no workers started ahead of the first driver (Flower's actors could
not use them), and a value the user set for that flag still wins."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server.local import simulation
from server.local.processes import Family

pytestmark = pytest.mark.slow

# A driver as Flower's Ray backend starts it (its own runtime env), then the largest number of idle workers seen.
DRIVER = """
import json, os, sys, time
import psutil, ray
ray.init(include_dashboard=False, num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
idle = 0
for _ in range(8):  # prestarted workers come up within a second or two of the driver
    time.sleep(0.4)
    procs = psutil.Process().children(recursive=True)
    idle = max(idle, sum(any(k in " ".join(p.cmdline()) for k in ("default_worker.py", "ray::IDLE")) for p in procs))
ray.shutdown()
print(json.dumps({"idle": idle}))
"""


def idle_workers(tmp_path, env_extra: dict[str, str]) -> int:
    env = simulation.child_env(tmp_path / "run", {**simulation.ray_env(""), **env_extra})
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    family = Family(driver)
    try:
        out, err = driver.communicate(timeout=120)
    finally:  # a driver that hung still has Ray's daemons under it: each is stopped by PID
        family.watch()
        family.stop()
    assert driver.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])["idle"]


def test_local_ray_starts_no_idle_workers_and_the_environment_wins(tmp_path, monkeypatch):
    assert simulation.PRESTART not in simulation.ray_env("127.0.0.1:6379")  # a cluster that is not ours: left alone
    without = idle_workers(tmp_path, {})
    monkeypatch.setenv(simulation.PRESTART, "1")  # the user's own setting is what ray_env hands on
    assert simulation.ray_env("")[simulation.PRESTART] == "1"
    with_prestart = idle_workers(tmp_path, simulation.ray_env(""))
    # Ray prestarts a worker per CPU (2 here) beside the one it starts anyway; without that, only the one.
    assert without <= 1 < with_prestart, (without, with_prestart)
