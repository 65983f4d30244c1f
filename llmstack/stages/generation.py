"""`llmstack generate`: decode continuations of prompts from a decoder-only (GPT, Gemma) or T5 model.

The model comes from a checkpoint, a consolidated / imported directory, or a Hugging Face
directory. GPT prompts are preceded by EOS when the tokenizer is llmstack's (pretraining
documents follow an EOS, so this is "start of a document"); T5 prompts end with EOS, as the
encoder inputs of span corruption do. Decoding stops at EOS (and at any --stop token): every
EOS id of the model (the tokenizer's, and the list an imported config.json / generation_config.json
names, such as Llama 3 Instruct's three), as transformers' `generate` on the export does.
With --chat, each message is a user turn under the chat template, rendered up to the assistant
header: llmstack's own (formats.encode_prompt; the reply stops at <|end|>) for its tokenizers, and
for a tokenizer brought with a model (Llama 3, Qwen, Gemma, Phi-3, ...) its own Jinja
`chat_template`, through transformers' `apply_chat_template(add_generation_prompt=True)`; the reply
then stops at the token the template closes an assistant turn with (<|eot_id|>, <|im_end|>,
<end_of_turn>, <|end|>) and at every EOS id.
The model runs on --device in --dtype (default auto: the GPU in bf16 when there is one, else the
CPU in fp32; see llmstack/generate.py), sampling seeded by --seed on that device.
"""

from __future__ import annotations

from data_pipeline import formats
from llmstack.errors import UsageError
from llmstack.generate import check_vocab, generate, place_model, resolve_placement, sampling_generator
from llmstack.stages.export import special_ids
from llmstack.train.weights import load_for_inference

DECODERS = ("gpt", "gemma", "hf")  # decoder-only families (hf: model.backend=hf checkpoints): prompts are continued


def stop_token_ids(tokenizer, stops: list[str]) -> list[int]:
    """Ids of --stop strings; each must be one token (a special token such as <|end|>, or text)."""
    ids = []
    for s in stops:
        tid = tokenizer.token_to_id(s)
        if tid is None:
            enc = tokenizer.encode(s)
            if len(enc) != 1:
                raise UsageError(f"--stop {s!r} is {len(enc)} tokens; a stop must be a single token")
            tid = enc[0]
        ids.append(tid)
    return ids


def chat_prompts(tokenizer, conversations: list[list[dict]]) -> tuple[list[list[int]], list[int]]:
    """(ids of each conversation up to the assistant's turn, the ids that end a reply) under the
    tokenizer's chat template: its own Jinja template when it brings one (formats.own_template),
    else llmstack's (<|end|> ends a reply). A template that fails is a UsageError."""
    from jinja2 import TemplateError

    hf = formats.own_template(tokenizer)
    if hf is None:
        try:
            end = formats.chat_tokens(tokenizer)["end"]
            return [formats.encode_prompt(tokenizer, m) for m in conversations], [end]
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        ids = [list(hf.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
               for m in conversations]
    except TemplateError as e:
        raise UsageError(f"the chat template of tokenizer {tokenizer.path} failed: {e}") from None
    return ids, end_of_turn_ids(hf)


def end_of_turn_ids(hf) -> list[int]:
    """The special token a chat template closes an assistant turn with (<|eot_id|>, <|im_end|>,
    <end_of_turn>, ...), found by rendering a reply: the first token after its content, when that
    is a special token; [] when there is none (the template ends turns with EOS or plain text)."""
    from jinja2 import TemplateError

    mark = "Reply text."
    turns = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": mark}]
    try:
        text = hf.apply_chat_template(turns, tokenize=False)
    except TemplateError:
        return []
    at = text.rfind(mark)
    if at < 0:
        return []
    tail = hf(text[at + len(mark):], add_special_tokens=False)["input_ids"]
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    return tail[:1] if tail and tail[0] in special else []


def run(model_path: str, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, repetition_penalty: float = 1.0, stop: list[str] = (), seed: int = 0,
        tokenizer_path: str | None = None, use_cache: bool = True, chat: list[str] = (),
        system: str | None = None, device: str = "auto", dtype: str = "auto") -> list[str]:
    """Generate and print one continuation per prompt (or one reply per --chat message under the
    chat template, see data_pipeline/formats.py); returns the texts."""
    if bool(prompts) == bool(chat):
        raise UsageError("give --prompt or --chat (one or more times; not both)")
    if system is not None and not chat:
        raise UsageError("--system goes with --chat")
    for name, value, ok in (("--max-new-tokens", max_new_tokens, max_new_tokens >= 1),
                            ("--temperature", temperature, temperature >= 0), ("--top-k", top_k, top_k >= 0),
                            ("--top-p", top_p, 0 < top_p <= 1), ("--repetition-penalty", repetition_penalty,
                                                                 repetition_penalty > 0)):
        if not ok:
            raise UsageError(f"{name} {value} is out of range")
    dev, dt = resolve_placement(device, dtype)  # before loading: a bad --device fails at once
    model, tok, info = load_for_inference(model_path, tokenizer_path)
    check_vocab(tok, info, model_path)
    family = info.model_family
    if family not in (*DECODERS, "t5"):
        raise UsageError(f"{model_path} is a {family} model (masked LM): generation needs a gpt or t5 model "
                         "(or gemma: a decoder-only or encoder-decoder family)")
    place_model(model, dev, dt)
    eos_ids = special_ids(tok, info)["eos"]  # the tokenizer's EOS and every one the model's config names
    eos = tok.eos_id if tok.eos_id is not None else (eos_ids[0] if eos_ids else None)  # the one a prompt takes
    ids = [tok.encode(p) for p in prompts]
    if family in DECODERS and tok.meta and eos is not None:
        ids = [[eos] + x for x in ids]
    chat_stops = []
    if chat:
        if family not in DECODERS:
            raise UsageError("--chat needs a decoder-only (gpt, gemma, model.backend=hf) chat model")
        head = [{"role": "system", "content": system}] if system else []
        ids, chat_stops = chat_prompts(tok, [[*head, {"role": "user", "content": c}] for c in chat])
        prompts = list(chat)
    if family == "t5" and eos is not None:
        ids = [x + [eos] for x in ids]
    if any(len(x) == 0 for x in ids):
        raise UsageError("empty prompt: give at least one token of text")
    stops = list(dict.fromkeys(stop_token_ids(tok, list(stop)) + chat_stops + eos_ids))
    pad = tok.pad_id if tok.pad_id is not None else 0
    try:
        out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, stop_ids=stops, pad_id=pad, use_cache=use_cache,
                       generator=sampling_generator(dev, seed))
    except ValueError as e:  # e.g. prompt + max_new_tokens longer than the model's context
        raise UsageError(str(e)) from None
    texts = []
    for prompt, new in zip(prompts, out):
        new = new[:-1] if new and new[-1] in stops else new
        text = tok.decode(new)
        texts.append(text)
        if chat:
            print(f"--- user: {prompt!r}\n{text}", flush=True)
        else:
            print(f"--- prompt: {prompt!r}\n{prompt if family in DECODERS else ''}{text}", flush=True)
    return texts
