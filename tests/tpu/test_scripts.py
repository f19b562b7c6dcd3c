"""tpu/tpu.py: the gcloud commands it prints in dry-run mode, the scripts it runs on the
workers (run here in a sandbox HOME with a fake trainer), and the watchdog's preemption
recovery against a fake `gcloud` on PATH. Nothing reaches the network."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU_PY = ROOT / "tpu" / "tpu.py"
WHERE = ["--zone=us-west4-a", "--project=my-proj"]
TRAIN = [
  "--config",
  "configs/kosmos2.py",
  "--workdir",
  "gs://bucket/runs/k2",
  "--config.optim.lr=1e-4",
  "--config.init_from=gs://bucket/it's here",
]
V5E = ["k2-v5e", *WHERE, "--accelerator-type=v5litepod-16", "--spot"]


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory, monkeypatch):
  """A `gcloud` first on PATH that fails loudly: a test reaching it has a dry run that runs."""
  guard = tmp_path_factory.mktemp("guard")
  (guard / "gcloud").write_text("#!/bin/sh\necho 'the real gcloud was called' >&2\nexit 99\n")
  (guard / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{guard}:{os.environ['PATH']}")


def tpu(*args, env=None):
  return subprocess.run(
    [sys.executable, str(TPU_PY), *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=60,
    check=False,
  )


def dry_run(*args):
  """The commands `tpu.py ARGS --dry-run` prints, each split back into its argv."""
  result = tpu(*args, "--dry-run")
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def script_of(cmd):
  """The script an ssh command runs on every worker; it must parse as bash."""
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", cmd[5]]
  assert "--worker=all" in cmd and "--strict-host-key-checking=no" in cmd
  [script] = [x[len("--command=") :] for x in cmd if x.startswith("--command=")]
  subprocess.run(["bash", "-n", "-c", script], check=True)
  return script


def step(cmd):
  """A printed or recorded command named by what it does."""
  if cmd[0] == "tar":
    return "pack"
  if cmd[3:5] == ["tpu-vm", "ssh"]:
    script = next(x for x in cmd if x.startswith("--command="))
    return next(
      name
      for key, name in (
        ("train-state", "probe"),
        ("bin/pip", "install"),
        ("nohup", "launch"),
        ("kill", "stop"),
      )
      if key in script
    )
  return cmd[4] if cmd[3] == "tpu-vm" else "qr-" + cmd[4]


def test_create_tpu_vm_spot():
  assert dry_run("create", *V5E) == [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "k2-v5e",
      *WHERE,
      "--accelerator-type=v5litepod-16",
      "--version=v2-alpha-tpuv5-lite",
      "--spot",
    ]
  ]


def test_create_queued_resource():
  cmds = dry_run(
    "create",
    "k2-v5p",
    "--zone=us-east5-a",
    "--queued",
    "--reserved",
    "--accelerator-type=v5p-128",
    "--create-flag=--network=tpu-net",
  )
  assert cmds == [
    [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "create",
      "k2-v5p",
      "--zone=us-east5-a",
      "--node-id=k2-v5p",
      "--accelerator-type=v5p-128",
      "--runtime-version=v2-alpha-tpuv5",
      "--reserved",
      "--network=tpu-net",
    ]
  ]
  assert (
    "--preemptible"
    in tpu(
      "create",
      "k2-v5p",
      "--zone=z",
      "--queued",
      "--preemptible",
      "--accelerator-type=v5p-128",
      "--dry-run",
    ).stderr
  )


@pytest.mark.parametrize(
  "accelerator, flags, version",
  [
    ("v4-32", [], "--version=tpu-ubuntu2204-base"),
    ("v6e-16", [], "--version=v2-alpha-tpuv6e"),
    ("v5p-8", ["--runtime-version=v2-alpha-tpuv5-custom"], "--version=v2-alpha-tpuv5-custom"),
  ],
)
def test_runtime_version(accelerator, flags, version):
  [cmd] = dry_run("create", "t", "--zone=z", f"--accelerator-type={accelerator}", *flags)
  assert version in cmd and not {"--spot", "--preemptible", "--reserved"} & set(cmd)


def test_setup_copies_this_checkout():
  tar, scp, ssh = dry_run("setup", "k2-v5e", *WHERE)
  assert tar[:3] == ["tar", "-czf", tar[2]] and tar[-3:] == ["-C", str(ROOT), "."]
  assert {"--exclude=.git", "--exclude=.venv", "--exclude=*.egg-info"} <= set(tar)
  assert scp == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    tar[2],
    "k2-v5e:kosmos-jax-src.tar.gz",
    *WHERE,
    "--worker=all",
    "--strict-host-key-checking=no",
  ]
  script = script_of(ssh)
  for part in (
    'tar -xzf "$HOME/kosmos-jax-src.tar.gz" -C "$K/src"',
    'python3.11 -m venv "$K/venv"',
    'install -q -e "$K/src[tpu]"',
    "install -y -q python3.11 python3.11-venv",
  ):
    assert part in script
  assert script.startswith("set -e; ")


def test_setup_clones_a_git_ref():
  [ssh] = dry_run(
    "setup",
    "k2-v5e",
    *WHERE,
    "--git-url=https://example.com/kosmos-jax.git",
    "--git-ref=v0.1 rc",
    "--python=python3.12",
  )
  script = script_of(ssh)
  assert (
    'git clone -q https://example.com/kosmos-jax.git "$K/src" && '
    "git -C \"$K/src\" checkout -q 'v0.1 rc'"
  ) in script
  assert 'python3.12 -m venv "$K/venv"' in script


def test_readme_examples(tmp_path):
  """Every tpu.py command in tpu/README.md runs, in dry-run mode."""
  readme = (ROOT / "tpu" / "README.md").read_text()
  lines = [
    line
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
    for line in block.splitlines()
    if "tpu/tpu.py " in line
  ]
  assert len(lines) >= 10
  for line in lines:
    words = shlex.split(line)
    while "=" in words[0]:  # a VAR=value prefix: DRY_RUN=1, which is set anyway
      words.pop(0)
    assert words[:2] == ["python3", "tpu/tpu.py"]
    result = tpu(*words[2:], env=dict(os.environ, DRY_RUN="1", TMPDIR=str(tmp_path)))
    assert result.returncode == 0 and result.stdout, f"{line}\n{result.stderr}"


def test_delete_logs_stop():
  assert dry_run("delete", "k2-v5e", *WHERE) == [
    ["gcloud", "compute", "tpus", "tpu-vm", "delete", "k2-v5e", *WHERE, "--quiet"]
  ]
  assert dry_run("delete", "k2-v5p", *WHERE, "--queued") == [
    [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "delete",
      "k2-v5p",
      *WHERE,
      "--force",
      "--quiet",
    ]
  ]
  [logs] = dry_run("logs", "k2-v5e", *WHERE, "--worker=3", "--lines=20")
  assert "--worker=3" in logs and 'tail -n 20 "$HOME/kosmos-jax/logs/train.log"' in logs[-1]
  assert "kill -TERM" in script_of(dry_run("stop", "k2-v5e", *WHERE)[0])


def test_overrides_only_where_a_trainer_runs():
  assert "takes no --config.* overrides" in tpu("setup", "t", "--zone=z", "--config.x=1").stderr


def test_watch_dry_run_prints_one_recovery():
  cmds = dry_run("watch", *V5E, *TRAIN, "--queued")
  assert [step(c) for c in cmds] == [
    "pack",
    "qr-describe",
    "qr-delete",
    "qr-create",
    "probe",
    "scp",
    "install",
    "launch",
  ]
  assert "--spot" in cmds[3] and "--format=value(state.state)" in cmds[1]
  for ssh in cmds[4], *cmds[6:]:
    script_of(ssh)


# --- the worker-side scripts, run here in a sandbox HOME -----------------------------------

FAKE_TRAINER = """#!/usr/bin/env bash
# Stands in for kosmos-jax: records its arguments, then does what $HOME/mode says.
printf '%s\\n' "$@" > "$HOME/argv"
echo "XLA_FLAGS=$XLA_FLAGS" >> "$HOME/argv"
case "$(cat "$HOME/mode")" in
  fail) exit 3 ;;
  # Saves on SIGTERM and exits 0; gives up after 30 s, so a failed test leaves nothing behind.
  wait) trap 'exit 0' TERM; for _ in $(seq 600); do sleep 0.05; done ;;
esac
"""


class Worker:
  """A TPU worker's home after setup, with a fake trainer in the venv."""

  def __init__(self, home):
    self.home, self.logs = home, home / "kosmos-jax" / "logs"
    (home / "kosmos-jax" / "src" / "tpu").mkdir(parents=True)
    shutil.copy(ROOT / "tpu" / "train_worker.sh", home / "kosmos-jax" / "src" / "tpu")
    trainer = home / "kosmos-jax" / "venv" / "bin" / "kosmos-jax"
    trainer.parent.mkdir(parents=True)
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)
    self.logs.mkdir()

  def run(self, script, mode=None):
    """Runs `script` as ssh would; `mode` tells the trainer it may start what to do."""
    if mode:
      (self.home / "mode").write_text(mode)
    env = dict(os.environ, HOME=str(self.home))
    return subprocess.run(
      ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )

  def state(self, probe):
    out = self.run(probe).stdout.split()
    assert out[0] == "train-state" and len(out) == 3
    return out[2]

  def wait_until_stopped(self, probe):
    deadline = time.time() + 10
    while self.state(probe) == "running" and time.time() < deadline:
      time.sleep(0.05)


def test_worker_scripts_launch_probe_stop(tmp_path):
  worker = Worker(tmp_path)
  [launch] = dry_run("launch", "k2-v5e", *WHERE, *TRAIN, "--env", "XLA_FLAGS=--a=1 --b")
  launch = script_of(launch)
  probe = script_of(next(c for c in dry_run("watch", *V5E, *TRAIN) if step(c) == "probe"))
  stop = script_of(dry_run("stop", "k2-v5e", *WHERE)[0])
  assert worker.state(probe) == "none"

  # Runs in the background; a second launch, and a setup, refuse while it runs.
  assert worker.run(launch, mode="wait").returncode == 0
  deadline = time.time() + 10
  while not (tmp_path / "argv").exists() and time.time() < deadline:  # it has read its mode
    time.sleep(0.05)
  assert worker.state(probe) == "running"
  assert "training is running" in worker.run(launch, mode="ok").stderr
  install = script_of(dry_run("setup", "k2-v5e", *WHERE, "--git-url=u")[0])
  assert worker.run(install).returncode == 1 and (tmp_path / "kosmos-jax" / "src").exists()
  # The trainer's arguments survive the printed command's quoting and the worker's shell.
  assert (tmp_path / "argv").read_text().splitlines() == [
    "train",
    "--multihost",
    *TRAIN,
    "XLA_FLAGS=--a=1 --b",
  ]

  # stop: the trainer exits 0 after its SIGTERM, and the run is marked interrupted, not done.
  assert "SIGTERM sent" in worker.run(stop).stdout
  worker.wait_until_stopped(probe)
  assert worker.state(probe) == "interrupted"
  assert (worker.logs / "exit_status").read_text().strip() == "0"

  assert worker.run(launch, mode="fail").returncode == 0
  worker.wait_until_stopped(probe)
  assert worker.state(probe) == "3"
  assert worker.run(launch, mode="ok").returncode == 0
  worker.wait_until_stopped(probe)
  assert worker.state(probe) == "0"
  log = (worker.logs / "train.log").read_text()
  assert log.count("kosmos-jax train on") == 3


def test_worker_logs_are_prefixed_with_the_host(tmp_path):
  worker = Worker(tmp_path)
  (worker.logs / "train.log").write_text("step 1\nstep 2\nstep 3\n")
  [logs] = dry_run("logs", "k2-v5e", *WHERE, "--lines=2")
  host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
  assert worker.run(logs[-1][len("--command=") :]).stdout.splitlines() == [
    f"{host}: step 2",
    f"{host}: step 3",
  ]


# --- the watchdog against a fake gcloud ----------------------------------------------------

FAKE_GCLOUD = """#!{python}
# Records each call; `describe` answers the next state, the probe the next training states
# (one per worker, comma-separated); a queue's last entry repeats.
import json, os, sys
d = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
  f.write(json.dumps(["gcloud", *args]) + "\\n")

def pop(name):
  with open(os.path.join(d, name)) as f:
    queue = f.read().split()
  with open(os.path.join(d, name), "w") as f:
    f.write("\\n".join(queue[1:] or queue))
  return queue[0]

script = next((x for x in args if x.startswith("--command=")), "")
if "describe" in args:
  state = pop("states")
  if state == "NOT_FOUND":
    sys.exit(print("ERROR: (gcloud) NOT_FOUND: Resource was not found", file=sys.stderr) or 1)
  print(state)
elif "create" in args and pop("create_exits") != "0":
  sys.exit(print("ERROR: no more capacity in the zone", file=sys.stderr) or 1)
elif "train-state" in script:
  for i, state in enumerate(pop("probes").split(",")):
    print(f"train-state t1v-n-w-{{i}} {{state}}")
"""


@pytest.fixture
def fake_gcloud(tmp_path):
  """Runs tpu.py with a fake gcloud first on PATH; returns (result, calls)."""
  (tmp_path / "bin").mkdir()
  gcloud = tmp_path / "bin" / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)

  def run(*args, states=("READY",), probes=("none",), create_exits=("0",), **env):
    for name, queue in (("states", states), ("probes", probes), ("create_exits", create_exits)):
      (tmp_path / name).write_text("\n".join(queue))
    env = dict(
      os.environ,
      PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
      FAKE_GCLOUD_DIR=str(tmp_path),
      TMPDIR=str(tmp_path),
      **env,
    )
    result = tpu(*args, env=env)
    log = tmp_path / "calls.jsonl"
    calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls

  return run


def test_watch_recovers_from_preemption(fake_gcloud, tmp_path):
  result, calls = fake_gcloud(
    "watch",
    *V5E,
    *TRAIN,
    "--interval=0",
    "--delete-when-done",
    states=["READY", "PREEMPTED", "READY"],
    probes=["running,running", "none,none", "0,0"],
  )
  assert result.returncode == 0, result.stderr
  assert [step(c) for c in calls] == [
    "describe",
    "probe",  # training runs
    "describe",
    "delete",
    "create",  # preempted: a new spot VM
    "describe",
    "probe",
    "scp",
    "install",
    "launch",  # READY, nothing there: set up, relaunch
    "describe",
    "probe",
    "delete",
  ]  # every trainer exited 0: done, TPU deleted
  assert calls[4][-1] == "--spot" and calls[4][5] == "k2-v5e"
  assert "k2-v5e: PREEMPTED" in result.stderr
  # The checkout is packed once, at the start, without the venv or git data.
  with tarfile.open(tmp_path / "kosmos-jax-k2-v5e.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"./setup.py", "./tpu/train_worker.sh", "./configs/kosmos2.py"} <= names
  assert not any(
    n.startswith(("./.venv", "./.git/")) or "__pycache__" in n or ".egg-info" in n for n in names
  )


def test_watch_queued_resource_suspended(fake_gcloud):
  result, calls = fake_gcloud(
    "watch",
    *V5E,
    *TRAIN,
    "--queued",
    "--git-url=https://example.com/k.git",
    "--interval=0",
    states=["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"],
    probes=["none", "interrupted", "0"],
  )
  assert result.returncode == 0, result.stderr
  assert [step(c) for c in calls] == [
    "qr-describe",
    "qr-delete",
    "qr-create",
    "qr-describe",
    "qr-describe",
    "probe",
    "install",
    "launch",
    "qr-describe",
    "probe",
    "launch",  # interrupted (e.g. maintenance): relaunch only
    "qr-describe",
    "probe",
  ]  # done; the TPU is kept without --delete-when-done
  assert calls[1][-2:] == ["--force", "--quiet"]
  assert "--node-id=k2-v5e" in calls[2] and "--spot" in calls[2]


def test_watch_creates_a_missing_tpu_and_retries_without_capacity(fake_gcloud):
  result, calls = fake_gcloud(
    "watch",
    *V5E,
    *TRAIN,
    "--git-url=u",
    "--interval=0",
    states=["NOT_FOUND", "NOT_FOUND", "READY"],
    probes=["none", "0"],
    create_exits=["1", "0"],
  )
  assert result.returncode == 0, result.stderr
  assert [step(c) for c in calls] == [
    "describe",
    "create",
    "describe",
    "create",
    "describe",
    "probe",
    "install",
    "launch",
    "describe",
    "probe",
  ]
  assert "retrying" in result.stderr


def test_watch_stops_when_a_trainer_fails(fake_gcloud):
  result, calls = fake_gcloud(
    "watch",
    *V5E,
    *TRAIN,
    "--git-url=u",
    "--interval=0",
    "--delete-when-done",
    states=["READY"],
    probes=["0,3,0,0"],
  )
  assert result.returncode == 1
  assert [step(c) for c in calls] == ["describe", "probe"]  # the TPU is kept for debugging
  assert "t1v-n-w-1: 3" in result.stderr and "training failed" in result.stderr


def test_dry_run_runs_nothing(fake_gcloud, tmp_path):
  for args in (
    ["create", *V5E],
    ["setup", *V5E[:3]],
    ["watch", *V5E, *TRAIN],
    ["launch", *V5E[:3], *TRAIN],
    ["logs", *V5E[:3]],
    ["stop", *V5E[:3]],
    ["delete", *V5E[:3]],
  ):
    flagged, calls = fake_gcloud(*args, "--dry-run")
    assert flagged.returncode == 0 and calls == [], flagged.stderr
    by_env, calls = fake_gcloud(*args, DRY_RUN="1")
    assert by_env.stdout == flagged.stdout and calls == []
    assert all(line.startswith(("gcloud ", "tar ")) for line in by_env.stdout.splitlines())
  assert not list(tmp_path.glob("*.tar.gz"))
