"""Engine and Redis command lines, defined once in local/launch.py."""

from __future__ import annotations

from local.launch import VLLM_CPU_FLAGS, redis_argv, vllm_argv


def test_vllm_flags_come_first_and_extra_flags_override_them() -> None:
    argv = vllm_argv("py", "/m", "name", 8001, max_num_seqs=4, extra=["--max-model-len", "4096"])
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-num-seqs") + 1] == "4"
    joined = " ".join(argv)
    assert " ".join(VLLM_CPU_FLAGS) in joined
    # vLLM's argparse keeps the last value of a repeated flag: the caller's.
    lens = [argv[i + 1] for i, a in enumerate(argv) if a == "--max-model-len"]
    assert lens == ["2048", "4096"]


def test_redis_is_loopback_and_persistent_only_when_asked() -> None:
    tmp = redis_argv(7000, "/tmp/x", persistent=False)
    kept = redis_argv(7000, "/tmp/x", persistent=True)
    for argv in (tmp, kept):
        assert argv[argv.index("--bind") + 1] == "127.0.0.1"
    assert tmp[tmp.index("--appendonly") + 1] == "no"
    assert kept[kept.index("--appendonly") + 1] == "yes"
    assert kept[kept.index("--maxmemory-policy") + 1] == "noeviction"


def test_vllm_runs_with_tool_calling_unless_turned_off() -> None:
    argv = vllm_argv("py", "/m", "name", 8001, max_num_seqs=4)
    assert "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
    off = vllm_argv("py", "/m", "name", 8001, max_num_seqs=4, tool_parser="none")
    assert "--enable-auto-tool-choice" not in off
    assert "--tool-call-parser" not in off


def test_several_served_names_are_one_engine_serving_each() -> None:
    argv = vllm_argv("py", "/m", "smol,smol-mini", 8001, max_num_seqs=4)
    i = argv.index("--served-model-name")
    assert argv[i + 1 : i + 3] == ["smol", "smol-mini"]
    assert argv[i + 3].startswith("--")
