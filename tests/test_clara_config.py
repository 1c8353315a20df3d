"""Tests for ClaraConfig (clara/config.py): derived sizes, validation messages, JSON round trip."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clara.config import ClaraConfig, ConfigError


def raises_exactly(message: str):
    return pytest.raises(ConfigError, match=f"^{re.escape(message)}$")


# -------------------------------------------------------------------------------------------
# Defaults and derived fields
# -------------------------------------------------------------------------------------------
def test_defaults_follow_the_official_cli():
    cfg = ClaraConfig()
    assert (cfg.compress_rate, cfg.doc_max_length, cfg.n_mem_tokens) == (32, 256, 8)
    assert cfg.distinct_mem_tokens and cfg.train_mem_embeddings and cfg.sep_token
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.1)
    assert cfg.lora_target_modules == "all-linear"
    assert cfg.lora_scaling == 2.0
    assert (cfg.generation_top_k, cfg.retrieval_temperature, cfg.training_stage) == (5, 0.02, "stage1")
    assert (cfg.mse_loss, cfg.qa_loss, cfg.max_new_tokens) == (False, False, 128)


def test_lora_alpha_defaults_to_twice_r_and_keeps_an_explicit_value():
    assert ClaraConfig(lora_r=8).lora_alpha == 16
    cfg = ClaraConfig(lora_r=8, lora_alpha=4)
    assert cfg.lora_alpha == 4 and cfg.lora_scaling == 0.5


@settings(max_examples=60, deadline=None)
@given(rate=st.integers(1, 256), n_mem=st.integers(1, 16))
def test_n_mem_tokens_is_doc_length_over_rate(rate, n_mem):
    cfg = ClaraConfig(compress_rate=rate, doc_max_length=rate * n_mem)
    assert cfg.n_mem_tokens == n_mem
    assert len(cfg.memory_tokens()) == n_mem


@settings(max_examples=60, deadline=None)
@given(rate=st.integers(2, 256), length=st.integers(1, 4096))
def test_a_length_that_does_not_divide_is_refused_naming_both_fields(rate, length):
    if length % rate == 0:
        assert ClaraConfig(compress_rate=rate, doc_max_length=length).n_mem_tokens == length // rate
        return
    with pytest.raises(ConfigError) as err:
        ClaraConfig(compress_rate=rate, doc_max_length=length)
    assert f"doc_max_length {length} is not a multiple of compress_rate {rate}" in str(err.value)


def test_divisibility_error_suggests_the_nearest_lengths():
    with raises_exactly("doc_max_length 100 is not a multiple of compress_rate 32; n_mem_tokens = "
                        "doc_max_length / compress_rate must be a whole number (try doc_max_length 96 or 128)"):
        ClaraConfig(compress_rate=32, doc_max_length=100)
    # Below one memory token's worth, only the larger length works.
    with raises_exactly("doc_max_length 20 is not a multiple of compress_rate 32; n_mem_tokens = "
                        "doc_max_length / compress_rate must be a whole number (try doc_max_length 32)"):
        ClaraConfig(compress_rate=32, doc_max_length=20)


# -------------------------------------------------------------------------------------------
# Validation messages, one per field
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"compress_rate": 0}, "compress_rate must be from 1 to 256, got 0"),
    ({"compress_rate": 257, "doc_max_length": 257}, "compress_rate must be from 1 to 256, got 257"),
    ({"doc_max_length": 0, "compress_rate": 1}, "doc_max_length must be at least 1, got 0"),
    ({"lora_r": 0}, "lora_r must be at least 1, got 0"),
    ({"lora_alpha": -1.0}, "lora_alpha must be positive, got -1.0"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1), got 1.0"),
    ({"lora_dropout": -0.1}, "lora_dropout must be in [0, 1), got -0.1"),
    ({"lora_target_modules": "q_proj"},
     "lora_target_modules must be 'all-linear' or a list of module names, got 'q_proj'"),
    ({"lora_target_modules": []},
     "lora_target_modules must be 'all-linear' or a non-empty list of module names, got []"),
    ({"lora_target_modules": ["q_proj", ""]},
     "lora_target_modules must be 'all-linear' or a non-empty list of module names, got ['q_proj', '']"),
    ({"training_stage": "stage3"},
     "training_stage must be one of stage1, stage1_2, stage2, stage2_pretrain_retrieval, got 'stage3'"),
    ({"generation_top_k": 0}, "generation_top_k must be at least 1, got 0"),
    ({"retrieval_temperature": 0.0}, "retrieval_temperature must be positive, got 0.0"),
    ({"mse_loss_weight": -0.5}, "mse_loss_weight must be zero or positive, got -0.5"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
    # Wrong types are named before any comparison happens.
    ({"compress_rate": "32"}, "compress_rate must be an integer, got '32'"),
    ({"compress_rate": True}, "compress_rate must be an integer, got True"),
    ({"doc_max_length": 256.0}, "doc_max_length must be an integer, got 256.0"),
    ({"sep_token": 1}, "sep_token must be true or false, got 1"),
    ({"distinct_mem_tokens": "yes"}, "distinct_mem_tokens must be true or false, got 'yes'"),
    ({"retrieval_temperature": float("nan")}, "retrieval_temperature must be a finite number, got nan"),
    ({"lora_alpha": "32"}, "lora_alpha must be a finite number or null, got '32'"),
    ({"training_stage": 1}, "training_stage must be a string, got 1"),
    ({"lora_target_modules": 3}, "lora_target_modules must be 'all-linear' or a list of module names, got 3"),
])
def test_validation_errors_name_the_field(kwargs, message):
    with raises_exactly(message):
        ClaraConfig(**kwargs)


# -------------------------------------------------------------------------------------------
# Special tokens
# -------------------------------------------------------------------------------------------
def test_special_tokens_distinct():
    cfg = ClaraConfig(compress_rate=64, doc_max_length=256)
    assert cfg.memory_tokens() == ["<MEM_0>", "<MEM_1>", "<MEM_2>", "<MEM_3>"]
    assert cfg.special_tokens() == ["<MEM_0>", "<MEM_1>", "<MEM_2>", "<MEM_3>", "<ENC>", "<SEP>", "<AE>"]


def test_special_tokens_shared_and_independent_of_sep_switch():
    cfg = ClaraConfig(compress_rate=64, doc_max_length=256, distinct_mem_tokens=False, sep_token=False)
    assert cfg.memory_tokens() == ["<MEM>"] * 4
    assert cfg.special_tokens() == ["<MEM>", "<ENC>", "<SEP>", "<AE>"]


# -------------------------------------------------------------------------------------------
# Dict / JSON round trip
# -------------------------------------------------------------------------------------------
def test_json_round_trip_keeps_every_field():
    cfg = ClaraConfig(compress_rate=16, doc_max_length=128, distinct_mem_tokens=False,
                      train_mem_embeddings=False, sep_token=False, lora_r=4, lora_dropout=0.0,
                      lora_target_modules=("q_proj", "v_proj"), training_stage="stage2",
                      generation_top_k=3, retrieval_temperature=0.05, mse_loss=True, qa_loss=True,
                      max_new_tokens=32)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert "n_mem_tokens" not in d  # derived, never written
    assert d["lora_target_modules"] == ["q_proj", "v_proj"]
    assert d["lora_alpha"] == 8
    back = ClaraConfig.from_dict(d)
    assert back == cfg
    assert back.lora_target_modules == ("q_proj", "v_proj")
    assert back.n_mem_tokens == 8


def test_from_dict_refuses_unknown_fields_by_name():
    with raises_exactly("unknown ClaraConfig field: compr_rate"):
        ClaraConfig.from_dict({"compr_rate": 32})
    with raises_exactly("unknown ClaraConfig fields: n_mem_tokens, sep"):
        ClaraConfig.from_dict({"sep": True, "n_mem_tokens": 8, "compress_rate": 32})


def test_from_dict_refuses_a_non_object():
    with raises_exactly("ClaraConfig.from_dict expects a JSON object, got list"):
        ClaraConfig.from_dict([])


def test_from_dict_validates_values():
    with raises_exactly("sep_token must be true or false, got 'false'"):
        ClaraConfig.from_dict({"sep_token": "false"})
