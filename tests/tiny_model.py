"""Build a tiny random Gemma 4 checkpoint (text MoE + tiny vision tower) that every test runs on.

    python -m tests.tiny_model OUT [--vision] [--nvfp4]
    python -m tests.tiny_model OUT --assistant     # its Gemma 4 assistant (MTP drafter)

The layout matches google/gemma-4-26B-A4B-it: `Gemma4ForConditionalGeneration`, a text model whose
layers carry a dense MLP beside 8 routed experts (top-2, fused 3-D `experts.gate_up_proj` /
`experts.down_proj`), full-attention layers with `attention_k_eq_v`, a vision tower and no audio tower.
The vision tower is always present because vLLM's Gemma 4 model builds it unconditionally; `--vision`
adds the processor files (image/video processors, audio feature extractor) that image and video
prompts need. Text-only use of the plain build in vLLM needs `language_model_only=True` (or all
`limit_mm_per_prompt` at 0), as vLLM otherwise loads the multimodal processor.

Chat format (the official Gemma 4 26B/31B template, tool calls left out):

    <bos><|turn>system\\n[<|think|>\\n]SYSTEM<turn|>\\n
    <|turn>user\\nTEXT<|image|>...<turn|>\\n
    <|turn>model\\nANSWER<turn|>\\n
    <|turn>model\\n[<|channel>thought\\n<channel|>]        <- generation prompt

Thinking: `enable_thinking=True` opens a system turn (even without a system message) that starts
with `<|think|>\\n`, and the generation prompt ends at `<|turn>model\\n`, so the model writes
`<|channel>thought\\nREASONING<channel|>ANSWER<turn|>`. With thinking off (the default) there is no
`<|think|>` and the generation prompt ends with an empty, closed channel `<|channel>thought\\n<channel|>`.
Reasoning is delimited by `<|channel>` ... `<channel|>` with a leading `thought\\n` label, which vLLM's
gemma4 reasoning parser strips; past assistant turns have such channels stripped by the template.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

SEED = 0
VOCAB_SIZE = 1024
# Fixed low ids, in this order (Gemma 4 uses the same tokens at ids near 0..260 000).
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
]  # fmt: skip
TOKEN_ID = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
# Named so that Gemma4Processor finds them (it reads tokenizer.image_token etc.; the audio ones even for text).
NAMED_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "video_token": "<|video|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
}  # fmt: skip
IMAGE_SOFT_TOKENS = 280  # Gemma 4's default image budget; one of 70/140/280/560/1120
VIDEO_SOFT_TOKENS = 70  # per frame

CHAT_TEMPLATE = """\
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}

{%- set loop_messages = messages -%}
{{- bos_token -}}
{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\\n' -}}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>\\n' -}}
    {%- endif -%}
    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {%- if messages[0]['content'] is string -%}
            {{- messages[0]['content'] | trim -}}
        {%- elif messages[0]['content'] is sequence -%}
            {%- for item in messages[0]['content'] -%}
                {{- item['text'] | trim + ' ' -}}
            {%- endfor -%}
        {%- endif -%}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}

{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\\n' -}}
    {%- if message['content'] is string -%}
        {%- if role == 'model' -%}
            {{- strip_thinking(message['content']) -}}
        {%- else -%}
            {{- message['content'] | trim -}}
        {%- endif -%}
    {%- elif message['content'] is sequence -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {%- if role == 'model' -%}
                    {{- strip_thinking(item['text']) -}}
                {%- else -%}
                    {{- item['text'] | trim -}}
                {%- endif -%}
            {%- elif item['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- elif item['type'] == 'audio' -%}
                {{- '<|audio|>' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '<|video|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
    {%- if not enable_thinking | default(false) -%}
        {{- '<|channel>thought\\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""

_WORDS = (
    "the a an and or but if then else when while for with without to from of in on at by about into over "
    "under after before between through is are was were be been being have has had do does did can could "
    "will would should may might must not no yes this that these those it its they them their we our you "
    "your he she his her i me my model user system assistant thought answer question image video frame "
    "picture photo color red green blue black white cat dog bird tree house car road city river mountain "
    "sun moon star sky water fire light time day night year hour minute second number one two three four "
    "five six seven eight nine ten hundred thousand first last next good bad big small new old long short "
    "high low hello thanks please sorry think reason explain describe write read list show tell give make "
    "find help know see look say ask use work call try need want like feel seem become leave put mean keep "
    "let begin run move live believe hold bring happen stand lose pay meet include continue learn change "
    "lead understand watch follow stop create speak allow add spend grow open walk win offer remember love "
    "consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise "
    "pass sell require report decide pull python code function value result error test data file chat "
    "gemma token text step plan because therefore however also only just very more most less much many"
).split()


def _corpus(lines: int = 600) -> list[str]:
    rng = random.Random(SEED)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2026)))
        line = " ".join(words)
        out.append(line[0].upper() + line[1:] + rng.choice([".", "?", "!", ",", ":"]))
    return out


def build_tokenizer():
    """Byte-level BPE trained on generated lines, Gemma 4 special tokens at ids 0..23, the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like Gemma's tokenizer: plain encode() prepends <bos>; chat templates emit it themselves.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", TOKEN_ID["<bos>"])]
    )
    for token, i in TOKEN_ID.items():
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        extra_special_tokens=NAMED_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )


def build_config():
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    text = Gemma4TextConfig(
        vocab_size=VOCAB_SIZE,
        vocab_size_per_layer_input=VOCAB_SIZE,
        hidden_size_per_layer_input=0,  # as in 26B-A4B: no per-layer input embeddings
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        global_head_dim=128,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        # 256: Marlin's NVFP4 MoE kernels need K and N in multiples of 128/64.
        moe_intermediate_size=256,
        final_logit_softcapping=30.0,
        max_position_embeddings=262144,
        pad_token_id=TOKEN_ID["<pad>"],
        bos_token_id=TOKEN_ID["<bos>"],
        eos_token_id=[TOKEN_ID["<eos>"], TOKEN_ID["<turn|>"]],
    )
    vision = Gemma4VisionConfig(
        hidden_size=64,
        # Not a multiple of 64, like the real tower (4304): vLLM then keeps the tower unquantized, as for 26B-A4B.
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        patch_size=16,
        pooling_kernel_size=3,
        position_embedding_size=1024,
        default_output_length=IMAGE_SOFT_TOKENS,  # vLLM's processor reads it
    )
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=TOKEN_ID["<|image>"],
        eoi_token_id=TOKEN_ID["<image|>"],
        image_token_id=TOKEN_ID["<|image|>"],
        video_token_id=TOKEN_ID["<|video|>"],
        boa_token_id=TOKEN_ID["<|audio>"],
        eoa_token_index=TOKEN_ID["<audio|>"],
        audio_token_id=TOKEN_ID["<|audio|>"],
        tie_word_embeddings=True,
    )
    config.dtype = "bfloat16"
    return config


def build_tiny_gemma4(out: Path, *, vision: bool = False) -> Path:
    """Write the bf16 checkpoint, tokenizer (and with `vision`, the processor) into `out`; same bytes every time."""
    import torch
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
        GenerationConfig,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"tiny gemma4: training tokenizer ({VOCAB_SIZE} tokens)", flush=True)
    tokenizer = build_tokenizer()

    print("tiny gemma4: initialising random weights", flush=True)
    torch.manual_seed(SEED)
    model = Gemma4ForConditionalGeneration(build_config()).to(torch.bfloat16).eval()
    # Gemma 4's recommended sampling, as the real generation_config.json carries it.
    model.generation_config = GenerationConfig(
        bos_token_id=TOKEN_ID["<bos>"],
        eos_token_id=[TOKEN_ID["<eos>"], TOKEN_ID["<turn|>"]],
        pad_token_id=TOKEN_ID["<pad>"],
        do_sample=True,
        temperature=1.0,
        top_p=0.95,
        top_k=64,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny gemma4: saving {n_params / 1e6:.1f} M parameters (bf16) to {out}", flush=True)
    model.save_pretrained(out)

    if vision:
        processor = Gemma4Processor(
            feature_extractor=Gemma4AudioFeatureExtractor(),  # mandatory even without an audio tower
            image_processor=Gemma4ImageProcessor(max_soft_tokens=IMAGE_SOFT_TOKENS),
            tokenizer=tokenizer,
            video_processor=Gemma4VideoProcessor(max_soft_tokens=VIDEO_SOFT_TOKENS),
            chat_template=CHAT_TEMPLATE,
            image_seq_length=IMAGE_SOFT_TOKENS,
        )
        processor.save_pretrained(out)
    else:
        tokenizer.save_pretrained(out)
    print(f"tiny gemma4: done ({'text + vision processor' if vision else 'text'})", flush=True)
    return out


def build_tiny_assistant(out: Path) -> Path:
    """A Gemma 4 assistant (MTP drafter) for the tiny model: random weights, the target's head layout (it reads
    the target's KV cache), a hidden size of its own."""
    import torch
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    target = build_config().text_config
    text = Gemma4TextConfig(
        vocab_size=VOCAB_SIZE,
        vocab_size_per_layer_input=0,
        hidden_size_per_layer_input=0,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_kv_shared_layers=2,  # every layer reads the target's KV cache
        enable_moe_block=False,
        max_position_embeddings=target.max_position_embeddings,
        **{k: getattr(target, k) for k in ASSISTANT_SHARES},
    )
    config = Gemma4AssistantConfig(text_config=text, backbone_hidden_size=target.hidden_size)
    config.dtype = "bfloat16"
    torch.manual_seed(SEED)
    Gemma4AssistantForCausalLM(config).to(torch.bfloat16).save_pretrained(Path(out))
    print(f"tiny gemma4: assistant (MTP drafter) saved to {out}", flush=True)
    return Path(out)


# What an assistant takes from its target: it attends over the target's keys and values.
ASSISTANT_SHARES = (
    "layer_types",
    "sliding_window",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "global_head_dim",
    "num_global_key_value_heads",
    "attention_k_eq_v",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vision", action="store_true", help="also write the image/video processor files")
    parser.add_argument("--nvfp4", action="store_true", help="quantize the bf16 build to NVFP4 (ModelOpt format)")
    parser.add_argument("--assistant", action="store_true", help="write the tiny model's MTP drafter instead")
    args = parser.parse_args(argv)
    if args.assistant:
        build_tiny_assistant(args.out)
        return
    if not args.nvfp4:
        build_tiny_gemma4(args.out, vision=args.vision)
        return
    from nvfp4.quantize import quantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="tiny-gemma4-bf16-") as tmp:
        src = build_tiny_gemma4(Path(tmp), vision=args.vision)
        print(f"tiny gemma4: quantizing to NVFP4 into {args.out}", flush=True)
        quantize_checkpoint(src, args.out)


if __name__ == "__main__":
    main()
