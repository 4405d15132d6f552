# SPDX-License-Identifier: Apache-2.0
"""``dflash-serve``: launch SGLang with DFLASH from a deployment YAML (see ``dflash_sglang.deploy.deployment``).

    python -m dflash_sglang.deploy.serve --config configs/qwen3-8b.yaml [--set key=value ...] [--dry-run] [--strict]

``--dry-run`` prints the equivalent shell command and exits 0. Otherwise this process is replaced
(``os.execv``) by ``python -m sglang.launch_server ...``, so signals and the exit status are SGLang's own.
A bad config exits 2 with one ``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dflash_sglang.deploy.deployment import (DeployConfigError, cpu_dtype_hint, format_command, launch_env,
                                             load_deploy_config, resolve_backends, to_launch_args)

logger = logging.getLogger("dflash_sglang.deploy.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, metavar="FILE", help="deployment YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key (YAML value), e.g. --set port=30001 or "
                             "--set extra_args.max_total_tokens=8192; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the SGLang command and exit")
    parser.add_argument("--strict", action="store_true",
                        help="fail when a requested attention backend cannot run here instead of falling back")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dflash-serve: %(message)s")
    try:
        cfg = load_deploy_config(args.config, args.overrides)
        cfg = resolve_backends(cfg, strict=args.strict or cfg.strict)
    except DeployConfigError as error:
        print(f"dflash-serve: error: {error}", file=sys.stderr)
        return 2
    command = to_launch_args(cfg)
    env = launch_env(cfg)
    hint = cpu_dtype_hint(cfg)
    if hint:
        logger.info(hint)
    if args.dry_run:
        if cfg.device == "cpu":
            logger.info("on a machine without a GPU driver, the launch also puts a libcuda stand-in on "
                        "LD_LIBRARY_PATH (dflash_sglang.deploy.cpu_stub)")
        print(format_command(command, env))
        return 0
    logger.info("exec %s", format_command(command, env))
    sys.stdout.flush()
    sys.stderr.flush()
    if cfg.device == "cpu":
        from dflash_sglang.deploy.cpu_stub import cpu_server_env

        os.execve(command[0], command, {**cpu_server_env(tp_size=cfg.tp_size), **env})
    os.execv(command[0], command)
    return 1  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
