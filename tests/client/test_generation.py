"""Generation-based evaluation on the tiny Llama: exact match, completion-only perplexity,
left padding, batching."""

from __future__ import annotations

import math

import pytest
import torch

from fedrot_client.answers import extractor_named
from fedrot_client.generation import GenerationResult, InstructionExample, evaluate_generation
from fedrot_client.generation import encode_completions
from fedrot_client.lora import LoraSpec, attach_lora
from fedrot_client.models import ModelSpec, TaskKind, load_base_model

LLAMA = ModelSpec("tiny-llama", TaskKind.CAUSAL_LM)
LLAMA_LORA = LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
EXACT = extractor_named("exact")
TAUGHT = (InstructionExample("Q: red?\nA: ", "12"), InstructionExample("Q: blue sky?\nA: ", "7"))
PROMPTS = (
    InstructionExample("Q: hi\nA:", "42"),
    InstructionExample("Q: a much longer prompt than the first\nA:", "seven"),
    InstructionExample("Q: mid length\nA:", "3.5"),
)


def tiny_lora_llama(seed: int = 1):
    """(PEFT tiny Llama with random, non-zero LoRA B, tokenizer)."""
    base = load_base_model(LLAMA)
    model = attach_lora(base, LLAMA_LORA, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model, base.tokenizer


@pytest.fixture(scope="module")
def taught():
    """A tiny Llama trained (all weights, 40 Adam steps) to answer TAUGHT's prompts."""
    model, tokenizer = tiny_lora_llama()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = encode_completions(tokenizer, TAUGHT, 64, tokenizer.pad_token_id)
    model.train()
    for _ in range(40):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, tokenizer


def completion_nlls(model, tokenizer, example: InstructionExample) -> list[float]:
    """Hand-computed NLL of each reference (+ EOS) token given everything before it."""
    prompt = tokenizer(example.prompt)["input_ids"]
    completion = tokenizer(example.reference + tokenizer.eos_token, add_special_tokens=False)
    ids = prompt + completion["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return [-logprobs[i - 1, ids[i]].item() for i in range(len(prompt), len(ids))]


def test_a_taught_model_matches_its_references_and_stops_at_eos(taught) -> None:
    model, tokenizer = taught
    result = evaluate_generation(model, tokenizer, TAUGHT, extractor=EXACT, max_new_tokens=8)
    assert result.predictions == ("12", "7")
    assert result.exact_match == 1.0
    assert result.num_samples == 2
    assert result.perplexity < 1.5


def test_wrong_references_score_zero_and_a_higher_perplexity(taught) -> None:
    model, tokenizer = taught
    right = evaluate_generation(model, tokenizer, TAUGHT, extractor=EXACT, max_new_tokens=8)
    swapped = [InstructionExample(TAUGHT[0].prompt, "7"),
               InstructionExample(TAUGHT[1].prompt, "12")]  # fmt: skip
    wrong = evaluate_generation(model, tokenizer, swapped, extractor=EXACT, max_new_tokens=8)
    assert wrong.predictions == right.predictions
    assert wrong.exact_match == 0.0
    assert wrong.perplexity > 10 * right.perplexity
    half = [TAUGHT[0], swapped[1]]
    assert evaluate_generation(model, tokenizer, half, extractor=EXACT).exact_match == 0.5


def test_the_extractor_decides_what_matches(taught) -> None:
    model, tokenizer = taught
    references = [InstructionExample(TAUGHT[0].prompt, "so it is 12.0"),
                  InstructionExample(TAUGHT[1].prompt, "#### 7")]  # fmt: skip
    last_number = extractor_named("last-number")
    assert evaluate_generation(model, tokenizer, references, extractor=last_number).exact_match == 1
    assert evaluate_generation(model, tokenizer, references, extractor=EXACT).exact_match == 0


def test_perplexity_is_the_completion_tokens_mean_nll() -> None:
    model, tokenizer = tiny_lora_llama()
    nlls = [nll for e in PROMPTS for nll in completion_nlls(model, tokenizer, e)]
    result = evaluate_generation(model, tokenizer, PROMPTS, extractor=EXACT, max_new_tokens=2)
    expected = sum(nlls) / len(nlls)
    assert len(nlls) == sum(len(e.reference) + 1 for e in PROMPTS)  # char tokens + EOS
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_truncation_keeps_the_start_and_scores_what_is_left() -> None:
    model, tokenizer = tiny_lora_llama()
    example = PROMPTS[0]
    prompt_length = len(tokenizer(example.prompt)["input_ids"])
    nlls = completion_nlls(model, tokenizer, example)
    result = evaluate_generation(model, tokenizer, [example], extractor=EXACT,
                                 max_new_tokens=2, max_length=prompt_length + 1)  # fmt: skip
    assert result.loss == pytest.approx(nlls[0], rel=1e-5)
    with pytest.raises(ValueError, match="max_length=3"):
        evaluate_generation(model, tokenizer, [example], extractor=EXACT, max_length=3)


def test_left_padding_gives_a_prompt_the_same_completion_alone_and_in_a_batch() -> None:
    model, tokenizer = tiny_lora_llama()
    alone = evaluate_generation(model, tokenizer, PROMPTS[:1], extractor=EXACT, max_new_tokens=8)
    batched = evaluate_generation(model, tokenizer, PROMPTS, extractor=EXACT, max_new_tokens=8)
    assert alone.predictions[0]  # something was generated: the comparison means something
    assert batched.predictions[0] == alone.predictions[0]
    assert tokenizer.padding_side == "right"  # left untouched


def test_batch_size_does_not_change_the_results() -> None:
    model, tokenizer = tiny_lora_llama()
    one = evaluate_generation(model, tokenizer, PROMPTS, extractor=EXACT, batch_size=1)
    all_ = evaluate_generation(model, tokenizer, PROMPTS, extractor=EXACT, batch_size=3)
    assert one.predictions == all_.predictions
    assert len(set(one.predictions)) == len(PROMPTS)
    assert one.exact_match == all_.exact_match
    assert one.loss == pytest.approx(all_.loss, rel=1e-5)


def test_a_tokenizer_without_pad_token_pads_with_eos() -> None:
    model, tokenizer = tiny_lora_llama()
    with_pad = evaluate_generation(model, tokenizer, PROMPTS, extractor=EXACT, max_new_tokens=8)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    without = evaluate_generation(model, tokenizer, PROMPTS, extractor=EXACT, max_new_tokens=8)
    assert without.predictions == with_pad.predictions
    assert without.loss == pytest.approx(with_pad.loss, rel=1e-5)


def test_no_examples_is_refused() -> None:
    model, tokenizer = tiny_lora_llama()
    with pytest.raises(ValueError, match="no instruction examples"):
        evaluate_generation(model, tokenizer, [], extractor=EXACT)


def test_to_dict_gives_the_numbers_only() -> None:
    result = GenerationResult(2, 0.5, 3.0, math.log(3.0), ("a", "b"))
    assert result.to_dict() == {"num_samples": 2, "exact_match": 0.5,
                                "perplexity": 3.0, "loss": math.log(3.0)}  # fmt: skip
