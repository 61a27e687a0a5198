"""Prefix signatures (shared.prefix): what cache-aware pickup compares."""

from __future__ import annotations

from llmq.shared.prefix import BLOCK_CHARS, MAX_BLOCKS, blocks, extend, signature

SYSTEM = {"role": "system", "content": "Be brief."}


def body(*messages: dict[str, str], **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": list(messages), **extra}


def test_a_conversations_turns_share_every_hash_of_the_earlier_turn() -> None:
    u1, a1, u2 = (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
    )
    first = signature(body(SYSTEM, u1), "m")
    second = signature(body(SYSTEM, u1, a1, u2), "m")
    assert len(first) == 2
    assert len(second) == 4
    assert second[:2] == first


def test_prompts_share_hashes_exactly_as_far_as_they_agree() -> None:
    one = signature(body(SYSTEM, {"role": "user", "content": "a"}), "m")
    two = signature(body(SYSTEM, {"role": "user", "content": "b"}), "m")
    other = signature(
        body({"role": "system", "content": "Be long."}, {"role": "user", "content": "a"}), "m"
    )
    assert one[0] == two[0]
    assert one[1] != two[1]
    assert other[0] != one[0]
    assert other[1] != one[1], "a chain: nothing after a difference matches"


def test_the_model_and_the_tools_are_part_of_the_prefix() -> None:
    plain = signature(body(SYSTEM), "m")
    assert signature(body(SYSTEM), "other") != plain
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = signature(body(SYSTEM, tools=tools), "m")
    assert len(with_tools) == 2
    assert with_tools[1] != plain[0]


def test_long_messages_are_several_blocks_and_the_signature_is_bounded() -> None:
    long = {"role": "user", "content": "x" * (3 * BLOCK_CHARS)}
    assert len(signature(body(long), "m")) == 4, "3 full blocks and the JSON around them"
    many = [{"role": "user", "content": str(i)} for i in range(2 * MAX_BLOCKS)]
    assert len(signature(body(*many), "m")) == MAX_BLOCKS
    assert len(list(blocks("m", many))) == 2 * MAX_BLOCKS, "the engine side reads them all"
    assert signature({"model": "m"}, "m") == ()
    assert signature(body(), "m") == ()


def test_an_answer_extends_the_chain_as_the_next_turn_will_hold_it() -> None:
    u1, a1 = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    *_, (last, _) = blocks("m", [SYSTEM, u1])
    [(answer, chars)] = list(extend(last, a1))
    assert answer.hex() == signature(body(SYSTEM, u1, a1), "m")[2]
    assert chars > 0


def test_no_prompt_text_is_in_the_signature() -> None:
    secret = "canary-7d1f"
    sig = signature(body({"role": "user", "content": secret}), "m")
    assert all(len(h) == 16 and secret not in h for h in sig)
