#!/usr/bin/env python3
"""Train kosmos-jax on Cloud TPU VMs and pods: create, setup, launch, watch, logs, stop, delete.

Runs on your workstation with the Google Cloud CLI and any Python >= 3.8; it imports
nothing from kosmos_jax. Every subcommand takes --dry-run (or DRY_RUN=1): it prints the
commands it would run, one per line, and runs nothing. Usage: tpu/README.md.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Default runtime (VM image) per TPU generation, from the Cloud TPU "software versions" page.
RUNTIMES = (
  ("v6e", "v2-alpha-tpuv6e"),
  ("v5p", "v2-alpha-tpuv5"),
  ("v5litepod", "v2-alpha-tpuv5-lite"),
)
OLDER_RUNTIME = "tpu-ubuntu2204-base"  # v4 and older

HEALTHY = ("READY", "ACTIVE")  # a TPU VM node / a queued resource that can run work
# Gone for good: a preempted spot VM or a suspended queued resource is deleted and created
# again. Other states (CREATING, PROVISIONING, WAITING_FOR_RESOURCES, ...) are waited out.
LOST = ("PREEMPTED", "TERMINATED", "SUSPENDED", "FAILED", "NOT_FOUND")

# Local files that never go to the workers.
EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "demo_out")

# On every worker: $K/src (the code, replaced by each setup), $K/venv, $K/logs.
PRELUDE = 'K="$HOME/kosmos-jax"'
# True while the train_worker.sh started by `launch` lives. A pid file can outlive a reboot,
# so the process's command line must name the script too.
RUNNING = (
  '[ -f "$K/logs/train.pid" ] && '
  'grep -qa train_worker "/proc/$(cat "$K/logs/train.pid")/cmdline" 2>/dev/null'
)
REFUSE_IF_RUNNING = (
  f'if {RUNNING}; then echo "$(hostname): training is running; stop it first" >&2; exit 1; fi'
)
# One line per worker: "train-state HOST STATE", STATE one of running, interrupted (the
# trainer got SIGTERM: a preemption notice or `stop`), none (never launched on this VM), or
# the trainer's exit status.
PROBE = "; ".join(
  [
    PRELUDE,
    f'if {RUNNING}; then s=running; elif [ -f "$K/logs/interrupted" ]; then s=interrupted; '
    f'elif [ -f "$K/logs/exit_status" ]; then s=$(cat "$K/logs/exit_status"); else s=none; fi',
    'echo "train-state $(hostname) $s"',
  ]
)


class Runner:
  """Runs commands; with dry_run, prints each shell-quoted on one line and runs nothing."""

  def __init__(self, dry_run):
    self.dry_run = dry_run

  def __call__(self, cmd, poll=False):
    """Runs `cmd`. A poll's output is captured, its failure returned; other failures raise."""
    if self.dry_run:
      print(shlex.join(cmd), flush=True)
      return None
    if poll:
      return subprocess.run(cmd, capture_output=True, text=True, check=False)
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True)


def log(message):
  print(time.strftime("%Y-%m-%d %H:%M:%S"), message, file=sys.stderr, flush=True)


# --- gcloud commands -------------------------------------------------------------------


def _where(a):
  return [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])


def _tpu_vm(a, verb, *flags):
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, a.name, *_where(a), *flags]


def _queued(a, verb, *flags):
  return ["gcloud", "compute", "tpus", "queued-resources", verb, a.name, *_where(a), *flags]


# A recreated TPU comes with new host keys; an unattended watchdog must not stop at the prompt.
_NO_HOST_KEY_PROMPT = "--strict-host-key-checking=no"


def _ssh(a, script, worker="all"):
  return _tpu_vm(a, "ssh", f"--worker={worker}", _NO_HOST_KEY_PROMPT, f"--command={script}")


def runtime_version(a):
  if a.runtime_version:
    return a.runtime_version
  return next((v for prefix, v in RUNTIMES if a.accelerator_type.startswith(prefix)), OLDER_RUNTIME)


def create(a, run):
  if a.queued:
    # The node gets the queued resource's name, so every other command addresses it the same.
    cmd = _queued(
      a,
      "create",
      f"--node-id={a.name}",
      f"--accelerator-type={a.accelerator_type}",
      f"--runtime-version={runtime_version(a)}",
    )
  else:
    cmd = _tpu_vm(
      a, "create", f"--accelerator-type={a.accelerator_type}", f"--version={runtime_version(a)}"
    )
  run(cmd + ([a.capacity] if a.capacity else []) + a.create_flag)


def delete(a, run):
  if a.queued:  # --force deletes the queued resource together with its node
    run(_queued(a, "delete", "--force", "--quiet"))
  else:
    run(_tpu_vm(a, "delete", "--quiet"))


def tpu_state(a, run):
  """The node's or queued resource's state; NOT_FOUND, or UNKNOWN when gcloud fails otherwise."""
  if a.queued:
    result = run(_queued(a, "describe", "--format=value(state.state)"), poll=True)
  else:
    result = run(_tpu_vm(a, "describe", "--format=value(state)"), poll=True)
  if result is None:
    return None
  if result.returncode == 0:
    return result.stdout.strip() or "UNKNOWN"
  return "NOT_FOUND" if "NOT_FOUND" in result.stderr else "UNKNOWN"


def train_state(a, run):
  """(summary, per-worker states). summary: running, failed, none, interrupted, done, unknown."""
  result = run(_ssh(a, PROBE), poll=True)
  if result is None:
    return None, ""
  workers = [
    line.split()[1:]
    for line in result.stdout.splitlines()
    if line.startswith("train-state ") and len(line.split()) == 3
  ]
  detail = ", ".join(f"{host}: {state}" for host, state in workers)
  states = {state for _, state in workers}
  if result.returncode != 0 or not states:  # ssh not up yet, or a worker did not answer
    return "unknown", detail
  if "running" in states:
    return "running", detail
  if states - {"interrupted", "none", "0"}:  # a trainer's non-zero exit status
    return "failed", detail
  for summary in ("none", "interrupted"):
    if summary in states:
      return summary, detail
  return "done", detail  # every trainer exited 0 without a SIGTERM: training is over


# --- setup and launch: the scripts each worker runs ----------------------------------------


def tarball_path(a):
  return os.path.join(tempfile.gettempdir(), f"kosmos-jax-{a.name}.tar.gz")


def pack(a, run):
  """Packs this checkout (uncommitted edits included) for the workers; a git URL needs none."""
  if not a.git_url:
    run(["tar", "-czf", tarball_path(a), *[f"--exclude={x}" for x in EXCLUDES], "-C", ROOT, "."])


def install_script(a):
  py = shlex.quote(a.python)
  if a.git_url:
    fetch = f'git clone -q {shlex.quote(a.git_url)} "$K/src"'
    if a.git_ref:
      fetch += f' && git -C "$K/src" checkout -q {shlex.quote(a.git_ref)}'
  else:
    fetch = (
      'mkdir "$K/src" && tar -xzf "$HOME/kosmos-jax-src.tar.gz" -C "$K/src" && '
      'rm "$HOME/kosmos-jax-src.tar.gz"'
    )
  return "; ".join(
    [
      "set -e",
      PRELUDE,
      REFUSE_IF_RUNNING,
      # TPU VM images ship an older Python; right after boot unattended-upgrades holds apt's lock.
      f"command -v {py} >/dev/null || {{ sudo apt-get -o DPkg::Lock::Timeout=600 update -q && "
      f"sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q {py} {py}-venv; }}",
      'mkdir -p "$K/logs" && rm -rf "$K/src"',
      fetch,
      f'[ -x "$K/venv/bin/python" ] || {py} -m venv "$K/venv"',  # kept across setups
      '"$K/venv/bin/pip" install -q --upgrade pip==25.3',
      '"$K/venv/bin/pip" install -q -e "$K/src[tpu]"',
    ]
  )


def install(a, run):
  if not a.git_url:
    run(
      [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        tarball_path(a),
        f"{a.name}:kosmos-jax-src.tar.gz",
        *_where(a),
        "--worker=all",
        _NO_HOST_KEY_PROMPT,
      ]
    )
  run(_ssh(a, install_script(a)))


def launch_script(a):
  worker = shlex.join(
    ["bash", "tpu/train_worker.sh", "--config", a.config, "--workdir", a.workdir, *a.overrides]
  )
  env = shlex.join(["env", *a.env]) + " " if a.env else ""
  return "; ".join(
    [
      "set -e",
      PRELUDE,
      'cd "$K/src"',
      REFUSE_IF_RUNNING,
      'rm -f "$K/logs/exit_status" "$K/logs/interrupted"',
      # Every stream redirected, so that ssh returns at once and the run survives the hangup.
      f'{env}nohup {worker} >> "$K/logs/train.log" 2>&1 < /dev/null & '
      'echo $! > "$K/logs/train.pid"',
    ]
  )


def launch(a, run):
  run(_ssh(a, launch_script(a)))


# --- subcommands ---------------------------------------------------------------------------


def cmd_setup(a, run):
  pack(a, run)
  install(a, run)


def cmd_logs(a, run):
  tail = f'tail -n {a.lines}{" -f" if a.follow else ""} "$HOME/kosmos-jax/logs/train.log"'
  run(_ssh(a, f'{tail} | sed -u "s/^/$(hostname): /"', worker=a.worker))


def cmd_stop(a, run):
  # SIGTERM to the trainer (it saves a checkpoint and exits) and to train_worker.sh (which
  # marks the run interrupted, so that `watch` relaunches it rather than calling it done).
  run(
    _ssh(
      a,
      "; ".join(
        [
          PRELUDE,
          f'if {RUNNING}; then p=$(cat "$K/logs/train.pid"); kill -TERM "$p"; pkill -TERM -P "$p"; '
          'echo "$(hostname): SIGTERM sent"; else echo "$(hostname): not running"; fi',
        ]
      ),
    )
  )


def cmd_watch(a, run):
  """Keeps a run alive until training ends: recreates a lost TPU, installs, relaunches."""
  pack(a, run)  # once: every recovery installs the code as it was when the watch began
  if run.dry_run:  # what one recovery runs, in order
    tpu_state(a, run)
    delete(a, run)
    create(a, run)
    train_state(a, run)
    install(a, run)
    launch(a, run)
    return 0
  seen = None
  while True:
    state = tpu_state(a, run)
    train, detail = train_state(a, run) if state in HEALTHY else (None, "")
    if (state, train) != seen:
      log(f"{a.name}: {state}" + (f", training {train} ({detail})" if train else ""))
      seen = (state, train)
    try:
      if state in LOST:
        if state != "NOT_FOUND":
          delete(a, run)
        create(a, run)
      elif train == "done":
        if a.delete_when_done:
          delete(a, run)
        return 0
      elif train == "failed":
        log(
          f"training failed on {a.name}; the TPU is kept: see `tpu.py logs {a.name} "
          f"--zone={a.zone}`"
        )
        return 1
      elif train == "none":  # a new VM, or one never set up
        install(a, run)
        launch(a, run)
      elif train == "interrupted":  # e.g. a maintenance restart: the install is still there
        launch(a, run)
    except subprocess.CalledProcessError as e:  # no capacity yet, ssh not up: try again
      log(f"{' '.join(e.cmd[:5])} failed (exit status {e.returncode}); retrying")
    time.sleep(a.interval)


COMMANDS = dict(
  create=create,
  setup=cmd_setup,
  launch=launch,
  watch=cmd_watch,
  logs=cmd_logs,
  stop=cmd_stop,
  delete=delete,
)


def build_parser():
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="TPU name (with --queued also the queued resource's)")
  common.add_argument("--zone", required=True, help="e.g. us-west4-a, us-east5-a")
  common.add_argument("--project", help="default: gcloud's configured project")
  common.add_argument(
    "--queued", action="store_true", help="the TPU comes from a queued resource of the same name"
  )
  common.add_argument(
    "--dry-run", action="store_true", help="print the commands, run nothing (also DRY_RUN=1)"
  )

  create = argparse.ArgumentParser(add_help=False)
  create.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-16, v5p-128, v4-32")
  create.add_argument(
    "--runtime-version",
    help="default by generation: "
    + ", ".join(f"{p}: {v}" for p, v in RUNTIMES)
    + f", older: {OLDER_RUNTIME}",
  )
  capacity = create.add_mutually_exclusive_group()
  for flag, text in (
    ("--spot", "spot capacity: cheaper, preempted at any time"),
    ("--preemptible", "the older preemptible TPU VMs (not queued resources)"),
    ("--reserved", "your reservation"),
  ):
    capacity.add_argument(flag, dest="capacity", action="store_const", const=flag, help=text)
  create.add_argument(
    "--create-flag",
    action="append",
    default=[],
    help="extra gcloud create flag, e.g. --create-flag=--network=NET (repeat)",
  )

  setup = argparse.ArgumentParser(add_help=False)
  setup.add_argument(
    "--git-url", help="clone this repository on the workers (default: copy this checkout)"
  )
  setup.add_argument("--git-ref", help="commit, tag or branch to check out after cloning")
  setup.add_argument("--python", default="python3.11", help="interpreter for the workers' venv")

  launch = argparse.ArgumentParser(add_help=False)
  launch.add_argument("--config", required=True, help="configs/NAME.py (in the repository)")
  launch.add_argument(
    "--workdir", required=True, help="gs://BUCKET/DIR, shared by all workers: checkpoints, metrics"
  )
  launch.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="environment variable for the trainer (repeat)",
  )

  watch = argparse.ArgumentParser(add_help=False)
  watch.add_argument("--interval", type=float, default=120, help="seconds between checks")
  watch.add_argument(
    "--delete-when-done",
    action="store_true",
    help="delete the TPU once every worker's trainer exited 0",
  )

  logs = argparse.ArgumentParser(add_help=False)
  logs.add_argument("--worker", default="all", help="worker index, or all")
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true", help="keep printing (tail -f)")

  parser = argparse.ArgumentParser(
    prog="tpu.py",
    description=__doc__.splitlines()[0],
    epilog="launch and watch pass --config.KEY=VALUE overrides on to the trainer.",
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for name, parents, text in (
    ("create", [create], "create the TPU VM (or queued resource)"),
    ("setup", [setup], "install the package on all workers"),
    ("launch", [launch], "start training on all workers"),
    (
      "watch",
      [create, setup, launch, watch],
      "create if missing, recreate after preemption, install, relaunch; until training ends",
    ),
    ("logs", [logs], "print the end of each worker's training log"),
    ("stop", [], "SIGTERM the trainer on all workers (it saves a checkpoint first)"),
    ("delete", [], "delete the TPU VM (or queued resource)"),
  ):
    sub.add_parser(name, parents=[common, *parents], help=text, description=text)
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  # The trainer's own --config.KEY=VALUE overrides pass through untouched.
  overrides = [x for x in argv if x.startswith("--config.")]
  parser = build_parser()
  a = parser.parse_args([x for x in argv if not x.startswith("--config.")])
  if overrides and a.command not in ("launch", "watch"):
    parser.error(f"{a.command} takes no --config.* overrides")
  if a.queued and getattr(a, "capacity", None) == "--preemptible":
    parser.error("queued resources take --spot or --reserved, not --preemptible")
  if any("=" not in x for x in getattr(a, "env", [])):
    parser.error("--env takes KEY=VALUE")
  a.overrides = overrides
  run = Runner(a.dry_run or os.environ.get("DRY_RUN", "") not in ("", "0"))
  try:
    return COMMANDS[a.command](a, run) or 0
  except subprocess.CalledProcessError as e:
    print(f"tpu.py: exit status {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
    return e.returncode
  except FileNotFoundError as e:  # gcloud (or tar) is not installed
    print(f"tpu.py: {e.filename} not found; install the Google Cloud CLI", file=sys.stderr)
    return 127
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
