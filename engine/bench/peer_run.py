"""``bench --peer-vllm PYTHON|auto`` and ``bench --endpoint URL``: start Helix's server (and vLLM's)
on loopback, compare them with :mod:`engine.bench.peer`, print and save the tables."""

from __future__ import annotations

import contextlib
import json
import sys

from engine import cli


def run_peer_bench(args) -> int:
    from engine.bench.endpoints import Endpoint, EndpointError, get_json, served_model
    from engine.bench.machine import machine_info
    from engine.bench.peer import QUICK_PEER, PeerConfig, compare, format_peer, helix_modes
    from engine.bench.prompts import load_prompts
    from engine.peers import HelixServer, PeerError, VLLMServer, ensure_venv
    from engine.peers.vllm import vllm_version

    if args.peer_vllm and args.endpoint:
        return cli.usage_error("give either --peer-vllm or --endpoint, not both")
    if args.no_draft:
        return cli.usage_error("the peer comparison serves the draft/target pair on both sides (drop --no-draft)")
    if args.target is not None and not args.draft:
        return cli.usage_error("the peer comparison needs a draft model: give --draft with --target")
    base = QUICK_PEER if args.quick else PeerConfig()
    cfg = PeerConfig(num_prompts=args.num_prompts or base.num_prompts,
                     max_tokens=(args.lengths[0] if args.lengths else base.max_tokens),
                     rounds=args.repeats or base.rounds,
                     concurrency=max(args.concurrency) if args.concurrency else base.concurrency,
                     waves=args.waves or base.waves, k=args.peer_k, quick=args.quick)
    if not 1 <= cfg.k <= 8:
        return cli.usage_error("--peer-k must be in 1..8")
    if args.endpoint and not args.endpoint.startswith(("http://", "https://")):
        return cli.usage_error(f"--endpoint must be an http:// or https:// URL, got {args.endpoint!r}")
    try:
        prompts = load_prompts(args.prompts_file)
    except (OSError, ValueError) as exc:
        return cli.usage_error(f"cannot read prompts: {exc}")
    config = cli.engine_config_from_args(args)
    threads = getattr(args, "threads", None)
    try:
        if args.endpoint:  # asked first: a wrong URL or key fails before any server starts
            peer = Endpoint("endpoint", args.endpoint.rstrip("/"), api_key=args.api_key)
            peer = Endpoint(f"endpoint {peer.url}", peer.url, model=args.endpoint_model or served_model(peer),
                            api_key=args.api_key)
        with contextlib.ExitStack() as stack:
            # Helix first: it starts in seconds, so a broken setup fails before vLLM's minute-long start
            helix = stack.enter_context(HelixServer(config.target, config.draft, dtype=args.dtype,
                                                    device=args.device, threads=threads))
            if args.peer_vllm:
                python = ensure_venv() if args.peer_vllm == "auto" else args.peer_vllm
                server = stack.enter_context(VLLMServer(python, config.target, config.draft, k=cfg.k,
                                                        threads=threads))
                peer = Endpoint(f"vllm {vllm_version(python) or ''} K={cfg.k}".replace("  ", " "), server.url,
                                model=server.model_name)
            base_ep = Endpoint("helix", helix.url)
            health = get_json(base_ep, "/health")
            started = {helix.url: helix} | ({server.url: server} if args.peer_vllm else {})
            results = compare(helix_modes(base_ep, cfg.k) + [peer], prompts, cfg, processes=started)
            results["paused_while_other_timed"] = sorted(started)
    except (PeerError, EndpointError) as exc:
        return cli.usage_error(str(exc))
    except KeyboardInterrupt:
        return 130
    results["machine"] = machine_info()
    results["machine"].update({k: health.get(k) for k in ("target", "draft", "device", "device_name", "dtype")})
    results["machine"]["torch_threads"] = threads or "server default"
    results["command"] = f"python main.py {' '.join(sys.argv[1:])}" if "bench" in sys.argv[1:] else None
    print(format_peer(results, markdown=args.markdown))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.strict and any(t["result"] == "MISS" for t in results["targets"]):
        return 1
    return 0
