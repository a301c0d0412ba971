"""Makes the onnxruntime-genai builder fixtures in this folder: tiny random GPT-OSS and LFM2-MoE
checkpoints (save_pretrained, with a word-level tokenizer the builder can load), then
onnxruntime-genai 0.18's model builder at fp32 for the CPU. Needs torch, transformers 5.17,
tokenizers and onnxruntime-genai 0.18 (not needed by the tests, which only read the .onnx files):

    python -m venv /tmp/genai-venv && /tmp/genai-venv/bin/pip install torch transformers==5.17.* onnxruntime-genai==0.18.0
    /tmp/genai-venv/bin/python models/ort_genai/generate.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GptOssConfig, GptOssForCausalLM, Lfm2MoeConfig, Lfm2MoeForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent


def checkpoints(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    made = {}
    # every layer full attention: a sliding-window layer would need onnxruntime-genai's fixed-size KV buffer
    gpt = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=256, sliding_window=32, layer_types=["full_attention", "full_attention"])
    lfm = Lfm2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, num_dense_layers=1,
                        layer_types=["full_attention", "conv", "full_attention"], max_position_embeddings=256)
    vocab = {f"t{i}": i for i in range(120)} | {"<unk>": 120, "<s>": 121, "</s>": 122, "<pad>": 123}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    for name, (cfg, cls) in {"gpt_oss": (gpt, GptOssForCausalLM), "lfm2_moe": (lfm, Lfm2MoeForCausalLM)}.items():
        m = cls(cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.2)
        d = root / name
        m.save_pretrained(d)
        fast.save_pretrained(d)
        made[name] = d
    return made


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, ckpt in checkpoints(Path(tmp)).items():
            out = Path(tmp) / f"{name}_onnx"
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                            "-p", "fp32", "-e", "cpu", "-c", str(Path(tmp) / "cache")], check=True)
            dst = HERE / name
            dst.mkdir(exist_ok=True)
            for f in ("model.onnx", "model.onnx.data"):
                shutil.copy(out / f, dst / f)
            print("wrote", dst)


if __name__ == "__main__":
    main()
