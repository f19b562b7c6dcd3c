"""`kosmos-jax convert`: Hugging Face snapshot <-> kosmos-jax (Orbax) checkpoint, and a
LoRA run's adapters merged into the weights or exported for PEFT."""

import json
import os


def add_parser(sub) -> None:
  convert = sub.add_parser(
    "convert", help="Hugging Face <-> kosmos-jax (Orbax) checkpoints; LoRA merge and PEFT export"
  )
  csub = convert.add_subparsers(dest="direction", required=True)
  to_orbax = csub.add_parser("hf-to-orbax", help="HF snapshot dir -> Orbax checkpoint")
  to_orbax.add_argument(
    "--hf-dir", required=True, help="config.json + model.safetensors[.index.json]"
  )
  to_orbax.add_argument("--out", required=True, help="checkpoint directory to write")
  to_orbax.add_argument(
    "--allow-pickle", action="store_true", help="accept pytorch_model.bin (unpickled weights-only)"
  )
  to_hf = csub.add_parser("orbax-to-hf", help="Orbax checkpoint -> HF snapshot dir")
  to_hf.add_argument("--ckpt", required=True, help="checkpoint directory")
  to_hf.add_argument("--out", required=True, help="directory for config.json + model.safetensors")
  merge = csub.add_parser(
    "merge-lora", help="LoRA run's workdir -> Orbax checkpoint with the adapters folded in"
  )
  merge.add_argument(
    "--checkpoint", required=True, help="trainer workdir (WORKDIR or WORKDIR@STEP)"
  )
  merge.add_argument("--out", required=True, help="checkpoint directory to write")
  peft = csub.add_parser(
    "lora-to-peft", help="LoRA run's workdir -> PEFT adapter for transformers' Kosmos-2"
  )
  peft.add_argument("--checkpoint", required=True, help="trainer workdir (WORKDIR or WORKDIR@STEP)")
  peft.add_argument(
    "--out", required=True, help="directory for adapter_config.json + adapter_model.safetensors"
  )


def run(args, overrides) -> None:
  del overrides
  from kosmos_jax.checkpoints import hf, loading  # pylint: disable=g-import-not-at-top
  from kosmos_jax.checkpoints import orbax as orbax_ckpt  # pylint: disable=g-import-not-at-top
  from kosmos_jax.models import build  # pylint: disable=g-import-not-at-top

  if args.direction in ("merge-lora", "lora-to-peft"):
    _lora(args)
  elif args.direction == "hf-to-orbax":
    hf_config, tensors = hf.read_hf_dir(args.hf_dir, allow_pickle=args.allow_pickle, progress=True)
    config = hf.config_from_hf(hf_config)
    params = hf.hf_to_params(
      tensors, config, progress=True, expected_shapes=build.abstract_params(config)
    )
    orbax_ckpt.save_params(args.out, config, params)
    sidecars = loading.copy_sidecars(args.hf_dir, args.out)
    count = sum(v.size for v in tensors.values() if v is not None)
    print(
      json.dumps(
        {"out": args.out, "tensors": len(tensors), "values": int(count), "copied": sidecars}
      )
    )
  else:
    config = orbax_ckpt.load_config(args.ckpt)
    params = orbax_ckpt.load_params(args.ckpt, build.abstract_params(config))
    hf.write_hf_dir(args.out, config, params)
    sidecars = loading.copy_sidecars(args.ckpt, args.out)
    print(json.dumps({"out": args.out, "copied": sidecars}))


def _lora(args) -> None:
  from kosmos_jax.checkpoints import loading, lora  # pylint: disable=g-import-not-at-top
  from kosmos_jax.checkpoints import orbax as orbax_ckpt  # pylint: disable=g-import-not-at-top

  where = loading.locate(args.checkpoint)
  if where.kind != "workdir":
    raise SystemExit(
      f"{args.checkpoint}: LoRA adapters live in a trainer workdir (config.json + checkpoints/); "
      f"this is a {'Hugging Face snapshot' if where.kind == 'hf' else 'converted checkpoint'}"
    )
  if args.direction == "merge-lora":
    result = lora.merge(where.path, args.out, where.step)
    # The tokenizer and processor files of the weights the run started from.
    init_from = orbax_ckpt.load_workdir_config(where.path).get("init_from", "")
    if init_from and os.path.isdir(init_from):
      result["copied"] = loading.copy_sidecars(init_from, args.out)
  else:
    result = lora.export_peft(where.path, args.out, where.step)
  print(json.dumps(result))
