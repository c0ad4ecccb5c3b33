"""Hub flows, offline: what push_to_hub uploads (through a fake Hub at huggingface_hub's boundary), the model
card (also after Trainer fine-tuning), and checkpoints that carry their code (trust_remote_code where
xlstm_hf is not installed; local classes where it is)."""

import fnmatch
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_relative_import_files

import xlstm_hf
from xlstm_hf import xLSTMConfig, xLSTMForCausalLM, xLSTMModel, load_gpt2_tokenizer
import xlstm_hf.hub as hub_module
from xlstm_hf.hub import (
    CARD_TAGS,
    model_card,
    recurrent_state_size,
    remote_code_problems,
    use_xlstm_model_card,
    xLSTMModelCardMixin,
)
from xlstm_hf.modeling_xlstm import CACHE_NAME

from conftest import paper_only, randomise_

REPO = "tester/xlstm-tiny"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md"}
CODE_TRAVELS = xLSTMForCausalLM._auto_class is not None  # registered by `import xlstm_hf` when it can travel
#: the files `save_pretrained` copies for trust_remote_code: the model's file and its sibling imports
CODE_FILES = {
    Path(f).name
    for f in [xlstm_hf.modeling_xlstm.__file__, *get_relative_import_files(xlstm_hf.modeling_xlstm.__file__),
              xlstm_hf.configuration_xlstm.__file__]
} if CODE_TRAVELS else set()
PROMPT_IDS = torch.tensor([[464, 3290, 286, 1204, 318, 50256, 11, 290, 262]])


#: the tiny models' design-specific settings (as in conftest.py): the paper's xLSTM[1:1], xLSTM-7B's block
DESIGN_KWARGS = {
    "paper": dict(slstm_at=[1], slstm_num_heads=2),
    "large": dict(block_design="large", qk_dim_factor=0.5, mlstm_round_up_to=8, gate_soft_cap=15.0,
                  logits_soft_cap=30.0, ffn_act_fn="swish", ffn_proj_factor=2.667, ffn_round_up_to=8),
}


def tiny_gpt2_model(seed: int = 0, design: str = "paper", **overrides) -> xLSTMForCausalLM:
    kwargs = dict(vocab_size=50304, hidden_size=32, num_blocks=2, mlstm_num_heads=2, chunk_size=8,
                  bos_token_id=50256, eos_token_id=50256, pad_token_id=50256, **DESIGN_KWARGS[design])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return randomise_(xLSTMForCausalLM(xLSTMConfig(**kwargs)), seed=seed).eval()


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n"), text[:200]
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def code_problems_message() -> str:
    return ("the model code cannot travel with checkpoints, so xlstm_hf did not register it for trust_remote_code:\n"
            + "\n".join(remote_code_problems(xLSTMForCausalLM)))


class FakeHub:
    """The Hub behind huggingface_hub's HfApi: each repo is a dict path -> bytes. Everything transformers and
    xlstm_hf do before the network (saving, building commit operations, reading cards) runs for real."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[SimpleNamespace] = []
        self.branches: list[tuple[str, str]] = []

    def install(self, monkeypatch):
        hub = self
        load_card = ModelCard.load.__func__

        def create_repo(api, repo_id, *args, **kwargs):
            hub.repos.setdefault(repo_id, {})
            return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, **kwargs):
            hub.branches.append((repo_id, branch))

        def commit(repo_id, files, message, revision=None):
            hub.commits.append(SimpleNamespace(repo_id=repo_id, files=files, message=message, revision=revision))
            hub.repos.setdefault(repo_id, {}).update(files)
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(hub.commits)}")

        def create_commit(api, repo_id, operations, *, commit_message=None, revision=None, **kwargs):
            files = {}
            for op in operations:
                with op.as_file() as f:
                    files[op.path_in_repo] = f.read()
            return commit(repo_id, files, commit_message, revision)

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, ignore_patterns=None, revision=None,
                          **kwargs):
            patterns = list(ignore_patterns or []) + [".git", ".git/*"]
            files = {}
            for path in sorted(Path(folder_path).rglob("*")):
                rel = path.relative_to(folder_path).as_posix()
                ignored = any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(path.name, p) for p in patterns)
                if path.is_file() and not ignored:
                    files[rel] = path.read_bytes()
            return commit(repo_id, files, commit_message, revision)

        def load(cls, repo_id_or_path, repo_type=None, token=None, ignore_metadata_errors=False):
            if Path(repo_id_or_path).is_file():
                return load_card(cls, repo_id_or_path, repo_type, token, ignore_metadata_errors)
            readme = hub.repos.get(str(repo_id_or_path), {}).get("README.md")
            if readme is None:
                raise EntryNotFoundError(f"README.md not found in {repo_id_or_path}")
            return cls(readme.decode("utf-8"), ignore_metadata_errors=ignore_metadata_errors)

        def no_network(api, *args, **kwargs):
            raise AssertionError("unexpected Hub call")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(HfApi, "model_info", no_network)
        monkeypatch.setattr(ModelCard, "load", classmethod(load))
        return self

    def readme(self, repo_id=REPO) -> str:
        return self.repos[repo_id]["README.md"].decode("utf-8")


@pytest.fixture
def hub(monkeypatch):
    return FakeHub().install(monkeypatch)


def load_uploaded(files: dict[str, bytes], folder: Path) -> xLSTMForCausalLM:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


# --------------------------------------------------------------------------------------------------
# (a) push_to_hub
# --------------------------------------------------------------------------------------------------


def test_model_code_can_travel():
    assert not remote_code_problems(xLSTMForCausalLM), code_problems_message()
    assert CODE_TRAVELS
    # the model, its config and the modules the model needs; not our Hub tooling (hub.py)
    assert CODE_FILES == {"configuration_xlstm.py", "modeling_xlstm.py", "cells.py", "backends.py", "slstm_autograd.py"}


def test_models_are_tagged_with_add_model_tags(monkeypatch):
    from transformers import PreTrainedModel

    calls = []
    add_model_tags = PreTrainedModel.add_model_tags
    monkeypatch.setattr(PreTrainedModel, "add_model_tags",
                        lambda self, tags: calls.append(list(tags)) or add_model_tags(self, tags))
    first, second = tiny_gpt2_model(), tiny_gpt2_model()
    assert calls == [list(CARD_TAGS)] * 4  # each causal LM and its backbone (an xLSTMModel)
    assert first.model_tags == list(CARD_TAGS) and first.model_tags is not second.model_tags  # per instance


def test_push_to_hub_uploads_weights_config_code_and_our_card(hub, tmp_path):
    model = tiny_gpt2_model()
    model.push_to_hub(REPO)

    (commit,) = hub.commits
    assert commit.repo_id == REPO
    assert set(commit.files) == MODEL_FILES | (CODE_FILES if CODE_TRAVELS else set())

    meta, body = front_matter(commit.files["README.md"].decode("utf-8"))
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert {"xlstm", "xlstm_paper", "recurrent"} <= set(meta["tags"])
    assert "datasets" not in meta and "base_model" not in meta
    assert f"# {REPO}\n" in body
    assert "| Layout | xLSTM[1:1]: 1 mLSTM block for every sLSTM block |" in body
    assert "| sLSTM blocks | 1 (blocks numbered 0 to 1) |" in body
    assert f"| Parameters | 3.2M ({model.num_parameters():,}) |" in body
    assert "no maximum length; constant memory per token" in body
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in body
    assert "https://arxiv.org/abs/2405.04517" in body and "@inproceedings{beck:24xlstm" in body
    assert ("trust_remote_code=True" in body) == CODE_TRAVELS

    generation = json.loads(commit.files["generation_config.json"])
    assert generation["eos_token_id"] == 50256 and generation["pad_token_id"] == 50256
    config = json.loads(commit.files["config.json"])
    assert config["model_type"] == "xlstm_paper"
    if CODE_TRAVELS:
        assert config["auto_map"] == {
            "AutoConfig": "configuration_xlstm.xLSTMConfig",
            "AutoModel": "modeling_xlstm.xLSTMModel",
            "AutoModelForCausalLM": "modeling_xlstm.xLSTMForCausalLM",
        }

    loaded = load_uploaded(commit.files, tmp_path / "download")
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT_IDS).logits, model(PROMPT_IDS).logits)


def test_push_to_hub_with_tokenizer_and_tokenizer_push_keeps_our_card(hub, tmp_path):
    model, tokenizer = tiny_gpt2_model(), load_gpt2_tokenizer()
    tokenizer_files = {Path(f).name for f in tokenizer.save_pretrained(tmp_path / "tok")}
    assert {"tokenizer.json", "tokenizer_config.json"} <= tokenizer_files

    model.push_to_hub(REPO, tokenizer=tokenizer)
    assert set(hub.commits[-1].files) == MODEL_FILES | tokenizer_files | (CODE_FILES if CODE_TRAVELS else set())
    _, body = front_matter(hub.readme())
    assert f"`{type(tokenizer).__name__}` (GPT-2's byte-level BPE) with 50,257 tokens, stored with the model" in body

    # the tokenizer's own push_to_hub (transformers' card path) reloads the Hub card and uploads it unchanged
    card_before = hub.readme()
    tokenizer.push_to_hub(REPO)
    assert set(hub.commits[-1].files) == tokenizer_files | {"README.md"}
    assert hub.readme() == card_before

    # the other order: the tokenizer first leaves transformers' generic card, which the model's push replaces
    other = "tester/tokenizer-first"
    tokenizer.push_to_hub(other)
    assert "🤗 transformers model" in hub.readme(other)
    model.push_to_hub(other)
    meta, body = front_matter(hub.readme(other))
    assert "xLSTM[1:1]" in body and "🤗 transformers model" not in body
    assert set(hub.repos[other]) == MODEL_FILES | tokenizer_files | (CODE_FILES if CODE_TRAVELS else set())

    downloaded = tmp_path / "download"
    loaded = load_uploaded(hub.repos[other], downloaded)
    assert AutoTokenizer.from_pretrained(downloaded)("ROMEO:").input_ids == tokenizer("ROMEO:").input_ids
    assert isinstance(loaded, xLSTMForCausalLM)


def test_push_to_hub_shards_with_small_max_shard_size(hub, tmp_path):
    model = tiny_gpt2_model()
    model.push_to_hub(REPO, max_shard_size="2MB")
    files = hub.commits[-1].files
    index = json.loads(files["model.safetensors.index.json"])
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(fnmatch.fnmatch(s, "model-*-of-*.safetensors") for s in shards)
    assert set(files) == (MODEL_FILES - {"model.safetensors"}) | {"model.safetensors.index.json"} | shards | (
        CODE_FILES if CODE_TRAVELS else set())
    loaded = load_uploaded(files, tmp_path / "download")
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT_IDS).logits, model(PROMPT_IDS).logits)


def test_push_to_hub_card_policy(hub):
    model = tiny_gpt2_model()
    hand_written = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My xLSTM\n\nWritten by hand.\n"

    # "auto": a hand-written card stays, gaining our tags and the required metadata
    hub.repos[REPO] = {"README.md": hand_written.encode()}
    model.push_to_hub(REPO)
    meta, body = front_matter(hub.readme())
    assert body.strip() == "# My xLSTM\n\nWritten by hand."
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert set(meta["tags"]) == {"mine", "xlstm", "xlstm_paper", "recurrent"}

    # "replace": ours, whatever the Hub has
    model.push_to_hub(REPO, model_card="replace", datasets="tester/corpus")
    meta, body = front_matter(hub.readme())
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["tester/corpus"] and "Written by hand" not in body

    # "auto" on a card of ours: regenerated, keeping metadata added on the Hub (license, language, tags)
    edited = hub.readme().replace("license: apache-2.0", "license: mit\nlanguage: en").replace(
        "- recurrent", "- recurrent\n- shakespeare")
    hub.repos[REPO]["README.md"] = edited.encode()
    model.push_to_hub(REPO, base_model="tester/xlstm-base")
    meta, body = front_matter(hub.readme())
    assert meta["license"] == "mit" and meta["language"] == "en" and "shakespeare" in meta["tags"]
    assert meta["datasets"] == ["tester/corpus"] and meta["base_model"] == "tester/xlstm-base"
    assert "It is fine-tuned from [tester/xlstm-base](https://huggingface.co/tester/xlstm-base)" in body
    model.push_to_hub(REPO, license="cc-by-4.0")
    assert front_matter(hub.readme())[0]["license"] == "cc-by-4.0"

    # "keep": even a generated card stays; a ModelCard is uploaded as given (plus tags)
    before = front_matter(hub.readme())[1]
    model.push_to_hub(REPO, model_card="keep", datasets="tester/other")
    assert front_matter(hub.readme())[1] == before
    model.push_to_hub(REPO, model_card=ModelCard("---\nlicense: mit\n---\n\n# Custom\n"))
    meta, body = front_matter(hub.readme())
    assert body.strip() == "# Custom" and {"xlstm", "xlstm_paper", "recurrent"} <= set(meta["tags"])

    with pytest.raises(ValueError, match="model_card must be one of"):
        model.push_to_hub(REPO, model_card="replce")


def test_push_to_hub_revision_and_commit_details(hub):
    model = tiny_gpt2_model()
    model.push_to_hub(REPO, revision="dev", commit_message="tiny", tags=["demo"])
    assert hub.branches == [(REPO, "dev")]
    assert hub.commits[-1].revision == "dev" and hub.commits[-1].message == "tiny"
    assert "demo" in front_matter(hub.readme())[0]["tags"]


def test_save_pretrained_writes_card_only_when_missing_and_push_flag(hub, tmp_path):
    model = tiny_gpt2_model()
    model.save_pretrained(tmp_path / "a")
    meta, body = front_matter((tmp_path / "a" / "README.md").read_text())
    assert meta["pipeline_tag"] == "text-generation" and "# a\n" in body
    assert 'AutoModelForCausalLM.from_pretrained("a")' in body

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("my own notes\n")
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "my own notes\n"

    # save_pretrained(push_to_hub=True): our card, uploaded and written into the folder (as transformers does)
    model.save_pretrained(tmp_path / "c", push_to_hub=True, repo_id=REPO, commit_message="from save")
    commit = hub.commits[-1]
    assert commit.message == "from save"
    assert set(commit.files) == MODEL_FILES | (CODE_FILES if CODE_TRAVELS else set())
    assert commit.files["README.md"].decode() == (tmp_path / "c" / "README.md").read_text()
    assert f"# {REPO}\n" in front_matter(hub.readme())[1]


def test_without_the_template_saving_and_pushing_still_work(hub, tmp_path, monkeypatch):
    """As under trust_remote_code, where hub.py runs without the xlstm_hf package and its template."""
    monkeypatch.setattr(xlstm_hf.hub, "TEMPLATE_PACKAGE", "no_such_package_holds_the_template")
    model = tiny_gpt2_model()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists() and (tmp_path / "model.safetensors").exists()
    model.push_to_hub(REPO)
    meta, body = front_matter(hub.readme())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"xlstm", "xlstm_paper", "recurrent"} <= set(meta["tags"]) and "trust_remote_code=True" in body
    assert "pip install xlstm-hf" not in body and "no install needed" in body


def test_card_says_how_to_install_and_continue_from_a_cache(monkeypatch):
    """No `pip install xlstm-hf` (not on PyPI): an install from the project's repository when pyproject.toml
    names one, else none; loading with trust_remote_code needs no install; the cache argument is the one the
    installed transformers uses."""
    model = tiny_gpt2_model()
    for url in ("https://example.org/someone/xlstm-hf", None):
        monkeypatch.setattr(hub_module, "repository_url", lambda: url)
        _, body = front_matter(str(model_card(model, model_name=REPO)))
        assert "pip install xlstm-hf" not in body and "pypi.org" not in body
        if url:
            assert f'With the package installed (`pip install "xlstm-hf @ git+{url}"`), `import xlstm_hf`' in body
            assert f"[`xlstm-hf`]({url})" in body
        else:
            assert "Where the `xlstm-hf` package is installed, `import xlstm_hf` registers" in body
            assert "pip install" not in body
        assert "Without the package (no install beyond transformers and torch)" in body
        assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)' in body
        assert f"model.generate(ids, {CACHE_NAME}=out.{CACHE_NAME}, ...)" in body
        if CACHE_NAME == "cache":  # transformers >= 5.24: past_key_values is the deprecated name
            assert "past_key_values" not in body


def test_repository_url_comes_from_the_package_metadata(monkeypatch):
    import email.message
    import importlib.metadata

    def fake_metadata(urls):
        message = email.message.Message()
        for url in urls:
            message["Project-URL"] = url
        return lambda name: message

    monkeypatch.setattr(importlib.metadata, "metadata",
                        fake_metadata(["Documentation, https://docs.example.org", "Repository, https://example.org/x.git"]))
    assert hub_module.repository_url() == "https://example.org/x.git"
    assert hub_module.install_command() == 'pip install "xlstm-hf @ git+https://example.org/x.git"'
    monkeypatch.setattr(importlib.metadata, "metadata", fake_metadata(["Documentation, https://docs.example.org"]))
    assert hub_module.repository_url() is None and hub_module.install_command() is None


def test_card_describes_other_layouts_and_base_model_paths():
    model = xLSTMModel(xLSTMConfig(vocab_size=97, hidden_size=32, num_blocks=4, slstm_at=[], mlstm_num_heads=2,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False))
    card = model_card(model, base_model="./my-local-base", model_name="my model", license="mit")
    meta, body = front_matter(str(card))
    assert meta["pipeline_tag"] == "feature-extraction" and "base_model" not in meta and meta["license"] == "mit"
    assert "| Layout | xLSTM[1:0]: mLSTM blocks only |" in body and "| sLSTM blocks | none |" in body
    assert "| Embedding | 97 x 32 |" in body and "| Heads | mLSTM 2 (head size 32) |" in body
    assert "AutoModel.from_pretrained(\"path/to/model\")" in body and "generate(" not in body
    assert "It is fine-tuned from `./my-local-base`." in body
    assert "Use the tokenizer stored with the model; bos 0, eos 1, pad 0. The embedding has 97 rows." in body


def test_recurrent_state_size_matches_the_cache(design):
    model = tiny_gpt2_model(design=design, num_blocks=3, **paper_only(design, slstm_at=[1]))
    with torch.no_grad():
        cache = model(PROMPT_IDS, use_cache=True).past_key_values
    tensors = [t for state in cache.states for t in state.values() if t is not None]
    assert recurrent_state_size(model) == (sum(t.numel() for t in tensors),
                                           sum(t.numel() * t.element_size() for t in tensors))


def test_card_describes_the_large_design(hub, tmp_path):
    """The card of an xLSTM-7B-style model: its layout, q/k/v widths, soft caps and recurrent state (C, n, m per
    block, no conv window), no sLSTM rows, the xLSTM 7B citation; pushed, it loads back as the same model."""
    model = tiny_gpt2_model(design="large", num_blocks=3)
    meta, body = front_matter(str(model_card(model)))
    assert meta["pipeline_tag"] == "text-generation" and {"xlstm", "xlstm_paper", "recurrent"} <= set(meta["tags"])
    assert "# xLSTM-large language model\n" in body
    assert "in the design of xLSTM 7B" in body and "https://arxiv.org/abs/2503.13427" in body
    assert "@inproceedings{beck:25xlstm7b" in body and "@inproceedings{beck:24xlstm" in body
    assert "| Layout | xLSTM-large: xLSTM-7B-style mLSTM blocks (no sLSTM blocks) |" in body
    assert ("| Blocks | 3 (pre-RMSNorm residual mLSTM layer, then pre-RMSNorm residual SwiGLU feed-forward) |"
            in body)
    assert "| Width | 32; q/k width 16, v width 32; feed-forward 88 |" in body
    assert "| Heads | mLSTM 2 (q/k head size 8, v head size 16) |" in body
    assert "| Soft caps | gates 15, logits 30 (c * tanh(x / c)) |" in body
    assert f"| Parameters | {model.num_parameters() / 1e6:.1f}M ({model.num_parameters():,}) |" in body
    # the paper design's rows and words do not appear
    for paper_text in ("sLSTM blocks |", "Block order", "inner width", "causal convolution", "sLSTM feed-forward"):
        assert paper_text not in body, paper_text
    # state per block: C (NH, DQK/NH, DV/NH), n (NH, DQK/NH), m (NH) in float32, nothing else
    values = 3 * (2 * 8 * 16 + 2 * 8 + 2)
    assert recurrent_state_size(model) == (values, 4 * values)
    assert "one 8 x 16 matrix memory\nper head" in body and f"that is {values:,} values,\n3.2 KiB per sequence" in body

    # the paper design's card with a logits cap shows it; without one it has no soft-cap row
    assert "| Soft caps | logits 30 (c * tanh(x / c)) |" in str(model_card(tiny_gpt2_model(logits_soft_cap=30.0)))
    assert "Soft caps" not in str(model_card(tiny_gpt2_model()))

    # xLSTM-7B itself (built on the meta device: no memory): 6.9B parameters, 128 MiB of state per sequence
    with torch.device("meta"):
        big = xLSTMForCausalLM(xLSTMConfig.from_preset("xlstm-7b"))
    _, big_body = front_matter(str(model_card(big, model_name="NX-AI/xLSTM-7b")))
    assert "| Width | 4096; q/k width 2048, v width 4096; feed-forward 10944 |" in big_body
    assert "| Heads | mLSTM 8 (q/k head size 256, v head size 512) |" in big_body
    assert "| Parameters | 6.9B (" in big_body and "128.3 MiB per sequence" in big_body
    assert recurrent_state_size(big)[0] == 32 * (8 * 256 * 512 + 8 * 256 + 8)

    model.push_to_hub(REPO)
    files = hub.commits[-1].files
    assert files["README.md"].decode() == str(model_card(model, model_name=REPO))
    assert json.loads(files["config.json"])["block_design"] == "large"
    loaded = load_uploaded(files, tmp_path / "download")
    assert loaded.config.block_design == "large" and loaded.config.logits_soft_cap == 30.0
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT_IDS).logits, model(PROMPT_IDS).logits)


# --------------------------------------------------------------------------------------------------
# (b) after Trainer fine-tuning
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def trained(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = load_gpt2_tokenizer()
    text = (Path(xlstm_hf.__file__).parent / "data" / "shakespeare_valid.txt").read_text(encoding="utf-8")[:8000]
    ids = tokenizer(text)["input_ids"]
    blocks = [ids[i: i + 32] for i in range(0, 32 * 10, 32)]
    model = tiny_gpt2_model()
    model.train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, hub_model_id=REPO,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"input_ids": blocks[:8]}),
        eval_dataset=datasets.Dataset.from_dict({"input_ids": blocks[8:]}),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    metrics = trainer.evaluate()
    return trainer, metrics


def test_card_after_trainer_fine_tuning(trained):
    trainer, metrics = trained
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    card = model_card(trainer.model, training=trainer, base_model="tester/xlstm-base", datasets=["tester/corpus"],
                      model_name=REPO)
    meta, body = front_matter(str(card))
    assert meta["base_model"] == "tester/xlstm-base" and meta["base_model_relation"] == "finetune"
    assert meta["datasets"] == ["tester/corpus"]
    assert "It is fine-tuned from [tester/xlstm-base](https://huggingface.co/tester/xlstm-base) on " \
           "[tester/corpus](https://huggingface.co/datasets/tester/corpus)." in body
    assert "## Training" in body and "Trained with the Transformers `Trainer`." in body
    assert "| Steps | 2 (" in body
    assert f"| Final training loss | {losses[-1]:.4f} (last logged step) |" in body
    assert f"| Evaluation loss | {metrics['eval_loss']:.4f} |" in body
    assert f"| Evaluation perplexity | {math.exp(metrics['eval_loss']):,.2f} |" in body
    assert "- learning_rate: 0.001" in body and "- max_steps: 2" in body and "- per_device_train_batch_size: 4" in body
    assert f"| 1 | {losses[0]:.4f} |  |" in body

    # the same from the trainer_state.json a checkpoint folder holds, and from a plain dict
    trainer.state.save_to_json(os.path.join(trainer.args.output_dir, "trainer_state.json"))
    from_file = str(model_card(trainer.model, training=trainer.args.output_dir, model_name=REPO))
    assert f"| Final training loss | {losses[-1]:.4f} (last logged step) |" in from_file
    from_dict = str(model_card(trainer.model, training={"steps": 10, "eval_loss": 2.0}, model_name=REPO))
    assert "| Steps | 10 |" in from_dict and f"| Evaluation perplexity | {math.exp(2.0):,.2f} |" in from_dict


def test_trainer_class_with_the_card_mixin(trained, hub):
    """`class CardTrainer(xLSTMModelCardMixin, Trainer)`: push_to_hub writes our card, with the card options
    Trainer.push_to_hub passes to create_model_card (finetuned_from, dataset_tags, license)."""
    from transformers import Trainer

    class CardTrainer(xLSTMModelCardMixin, Trainer):
        pass

    trained_trainer, _ = trained
    trainer = CardTrainer(model=trained_trainer.model, args=trained_trainer.args,
                          processing_class=trained_trainer.processing_class)
    trainer.state = trained_trainer.state
    trainer.push_to_hub(finetuned_from="tester/xlstm-base", dataset_tags="tester/corpus", license="mit")
    meta, body = front_matter(hub.commits[-1].files["README.md"].decode())
    assert meta["base_model"] == "tester/xlstm-base" and meta["datasets"] == ["tester/corpus"]
    assert meta["license"] == "mit" and {"xlstm", "xlstm_paper", "recurrent"} <= set(meta["tags"])
    assert f"# {REPO}\n" in body and "## Training" in body and "Trainer had access to" not in body


def test_trainer_push_to_hub_cards(trained, hub):
    trainer, _ = trained
    # Trainer's own card (create_model_card overwrites README.md), tagged with the model's model_tags
    trainer.push_to_hub()
    files = hub.commits[-1].files
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    meta, body = front_matter(files["README.md"].decode())
    assert {"generated_from_trainer", "xlstm", "xlstm_paper", "recurrent"} <= set(meta["tags"])
    assert "generated automatically according to the information the Trainer had access to" in body

    # with use_xlstm_model_card: our card, with the Trainer's metadata merged in; the trainer is now an instance of a
    # subclass of its class (no method patched onto the instance)
    trainer_class = type(trainer)
    assert use_xlstm_model_card(trainer, base_model="tester/xlstm-base") is trainer
    assert isinstance(trainer, trainer_class) and isinstance(trainer, xLSTMModelCardMixin)
    assert "create_model_card" not in vars(trainer)
    trainer.push_to_hub()
    meta, body = front_matter(hub.commits[-1].files["README.md"].decode())
    assert {"generated_from_trainer", "xlstm", "xlstm_paper", "recurrent"} <= set(meta["tags"])
    assert meta["base_model"] == "tester/xlstm-base" and meta["pipeline_tag"] == "text-generation"
    assert "model-index" in meta  # from the Trainer's card
    assert f"# {REPO}\n" in body and "## Training" in body and "| Steps | 2 (" in body
    assert "Trainer had access to" not in body and "GPT2Tokenizer" in body

    # model.push_to_hub(training=trainer) replaces the (generated) Trainer card on the Hub with ours
    hub.repos[REPO]["README.md"] = files["README.md"]
    trainer.model.push_to_hub(REPO, training=trainer)
    meta, body = front_matter(hub.readme())
    assert "## Training" in body and "generated_from_trainer" in meta["tags"] and "Trainer had access to" not in body


# --------------------------------------------------------------------------------------------------
# (c) trust_remote_code without xlstm_hf, (d) with it
# --------------------------------------------------------------------------------------------------

REMOTE_SCRIPT = textwrap.dedent('''
    import sys


    class BlockXlstmHf:
        """Pretend xlstm_hf is not installed."""

        def find_spec(self, name, path=None, target=None):
            if name == "xlstm_hf" or name.startswith("xlstm_hf."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, BlockXlstmHf())

    import json
    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, repo_id, expected_file, resaved, large_folder, large_expected_file = sys.argv[1:7]
    try:
        import xlstm_hf  # noqa: F401
        raise SystemExit("xlstm_hf is importable")
    except ImportError:
        pass

    expected = torch.load(expected_file)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads config.json too
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    greedy = model.generate(expected["ids"], max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=4,
                                           do_sample=False)[0])

    # the same checkpoint as pushed to the Hub, from the (offline) Hub cache: transformers checks the imports of
    # every copied file on this path
    from_hub = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
    with torch.no_grad():
        hub_equal = torch.equal(from_hub(expected["ids"]).logits, expected["logits"])

    model.save_pretrained(resaved)  # code loaded from a checkpoint travels on; no template here, so no card
    again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True).eval()
    with torch.no_grad():
        again_equal = torch.equal(again(expected["ids"]).logits, logits)

    # a model of the large design (xLSTM-7B's blocks), from the same copied code
    large_expected = torch.load(large_expected_file)
    large = AutoModelForCausalLM.from_pretrained(large_folder, trust_remote_code=True).eval()
    with torch.no_grad():
        large_logits_equal = torch.equal(large(large_expected["ids"]).logits, large_expected["logits"])
    large_greedy_equal = torch.equal(large.generate(large_expected["ids"], max_new_tokens=8, do_sample=False),
                                     large_expected["greedy"])

    from transformers import xLSTMConfig as HFxLSTMConfig, xLSTMForCausalLM as HFxLSTMForCausalLM
    upstream = AutoModelForCausalLM.from_config(HFxLSTMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                              num_heads=2))
    print(json.dumps({
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "config_class": f"{type(model.config).__module__}.{type(model.config).__name__}",
        "logits_equal": torch.equal(logits, expected["logits"]),
        "greedy_equal": torch.equal(greedy, expected["greedy"]),
        "hub_class": type(from_hub).__module__,
        "hub_equal": hub_equal,
        "text": text,
        "resaved": sorted(os.listdir(resaved)),
        "again_equal": again_equal,
        "large": [type(large).__module__, large.config.block_design, large_logits_equal, large_greedy_equal],
        "upstream_unaffected": type(upstream) is HFxLSTMForCausalLM
                               and type(AutoConfig.for_model("xlstm")) is HFxLSTMConfig,
        "xlstm_hf_loaded": any(name.split(".")[0] == "xlstm_hf" for name in sys.modules),
    }))
''')


def test_trust_remote_code_without_xlstm_hf(hub, tmp_path, cpu_kernels_off):
    """A child process where importing xlstm_hf fails loads a saved folder and the pushed repository (and a
    saved folder of the large design), and computes bitwise what the package computes without its optional
    fused kernels (which the copied code does not carry)."""
    assert CODE_TRAVELS, code_problems_message()
    model, tokenizer = tiny_gpt2_model(), load_gpt2_tokenizer()
    folder = tmp_path / "xlstm-tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert CODE_FILES <= set(os.listdir(folder)) and "hub.py" not in os.listdir(folder)
    # what push_to_hub uploaded, as a download in an offline Hub cache
    model.push_to_hub(REPO, tokenizer=tokenizer)
    commit_hash = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hf-cache" / f"models--{REPO.replace('/', '--')}"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(commit_hash)
    assert "hub.py" not in hub.repos[REPO]
    for name, data in hub.repos[REPO].items():
        (repo_cache / "snapshots" / commit_hash).mkdir(parents=True, exist_ok=True)
        (repo_cache / "snapshots" / commit_hash / name).write_bytes(data)
    with torch.no_grad():
        logits = model(PROMPT_IDS).logits
    greedy = model.generate(PROMPT_IDS, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=4,
                                           do_sample=False)[0])
    torch.save({"ids": PROMPT_IDS, "logits": logits, "greedy": greedy}, tmp_path / "expected.pt")
    large = tiny_gpt2_model(design="large")
    large.save_pretrained(tmp_path / "xlstm-large")
    with torch.no_grad():
        large_logits = large(PROMPT_IDS).logits
    large_greedy = large.generate(PROMPT_IDS, max_new_tokens=8, do_sample=False)
    torch.save({"ids": PROMPT_IDS, "logits": large_logits, "greedy": large_greedy}, tmp_path / "expected-large.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ""}
    args = [str(folder), REPO, str(tmp_path / "expected.pt"), str(tmp_path / "resaved"), str(tmp_path / "xlstm-large"),
            str(tmp_path / "expected-large.pt")]
    out = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith(".xLSTMForCausalLM")
    assert result["config_class"].startswith("transformers_modules.")
    assert result["logits_equal"] and result["greedy_equal"] and result["text"] == text
    assert result["hub_class"].startswith("transformers_modules.tester.") and result["hub_equal"]
    assert set(result["resaved"]) == {"config.json", "generation_config.json", "model.safetensors"} | CODE_FILES
    assert result["again_equal"] and result["upstream_unaffected"] and not result["xlstm_hf_loaded"]
    large_module, large_design, large_logits_equal, large_greedy_equal = result["large"]
    assert large_module.startswith("transformers_modules.") and large_design == "large"
    assert large_logits_equal and large_greedy_equal


INSTALLED_REMOTE_SCRIPT = textwrap.dedent('''
    import json
    import os
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    folder, expected_file, resaved = sys.argv[1:4]
    expected = torch.load(expected_file)
    # xlstm_hf is installed but not imported: the copied modeling_xlstm.py imports xlstm_hf.hub (and so the package)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    greedy = model.generate(expected["ids"], max_new_tokens=8, do_sample=False)
    model.save_pretrained(resaved)
    import xlstm_hf.hub

    print(json.dumps({"class": type(model).__module__, "greedy_equal": torch.equal(greedy, expected["greedy"]),
                      "hub_mixin": isinstance(model, xlstm_hf.hub.xLSTMHubMixin),
                      "resaved": sorted(os.listdir(resaved))}))
''')


def test_trust_remote_code_where_xlstm_hf_is_installed_but_not_imported(tmp_path):
    """The copied code then uses the installed Hub tooling (no circular import): our card on save_pretrained."""
    model = tiny_gpt2_model()
    model.save_pretrained(tmp_path / "folder")
    greedy = model.generate(PROMPT_IDS, max_new_tokens=8, do_sample=False)
    torch.save({"ids": PROMPT_IDS, "greedy": greedy}, tmp_path / "expected.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", INSTALLED_REMOTE_SCRIPT, str(tmp_path / "folder"),
                          str(tmp_path / "expected.pt"), str(tmp_path / "resaved")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["class"].startswith("transformers_modules.") and result["greedy_equal"] and result["hub_mixin"]
    assert set(result["resaved"]) == MODEL_FILES | CODE_FILES  # README.md: our card, written by the installed mixin


def test_saved_folders_load_local_classes_with_xlstm_hf_installed(tmp_path, design):
    model = tiny_gpt2_model(design=design)
    model.save_pretrained(tmp_path)
    for kwargs in ({}, {"trust_remote_code": True}):
        assert type(AutoConfig.from_pretrained(tmp_path, **kwargs)) is xLSTMConfig
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
        assert type(loaded) is xLSTMForCausalLM  # the installed class, not transformers_modules.*
        assert type(AutoModel.from_pretrained(tmp_path, **kwargs)) is xLSTMModel
        with torch.no_grad():
            assert torch.equal(loaded.eval()(PROMPT_IDS).logits, model(PROMPT_IDS).logits)
    assert not any(name.startswith("transformers_modules") and "xlstm" in name.lower() for name in sys.modules)

    from transformers import xLSTMConfig as HFxLSTMConfig
    from transformers import xLSTMForCausalLM as HFxLSTMForCausalLM

    upstream = HFxLSTMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2)
    assert type(AutoModelForCausalLM.from_config(upstream)) is HFxLSTMForCausalLM
    assert type(AutoConfig.for_model("xlstm")) is HFxLSTMConfig
