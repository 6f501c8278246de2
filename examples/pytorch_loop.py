"""A federated client around a plain PyTorch training loop: instruction tuning of a causal LM
on prompt/completion JSONL, with the loss on the completion tokens only.

    FEDROT_CLIENT_SERVER=server:50051 FEDROT_CLIENT_TOKEN=... \
        python examples/pytorch_loop.py my-data.jsonl --out final-adapter/

Each JSONL line is {"prompt": "...", "completion": "..."}. The connection (server, token or
token file, TLS, state folder) comes from the FEDROT_CLIENT_* environment, as for fedrot-client.
"""

import argparse
import json

import torch

import fedrot_client


OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}  # the server's names


def encode(tokenizer, rows, max_length, device):
    """Prompt + completion + EOS, right-padded; labels -100 on the prompt and the padding."""
    ids, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False)
        ids.append((prompt + answer["input_ids"])[:max_length])
        labels.append(([-100] * len(prompt) + answer["input_ids"])[:max_length])
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }
    return {name: tensor.to(device) for name, tensor in batch.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--out", default="final-adapter")
    options = parser.parse_args()
    with open(options.data) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]

    with fedrot_client.connect() as fed:
        model, tokenizer = fed.build_model(), fed.tokenizer
        for task in fed.tasks():
            task.load_into(model)  # the round's global adapter; only this round's factors train
            plan = task.training
            steps = plan.local_steps or plan.epochs * -(-len(rows) // plan.batch_size)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = OPTIMIZERS[plan.optimizer](trainable, lr=plan.learning_rate,
                                                   weight_decay=plan.weight_decay)
            order = torch.Generator().manual_seed(plan.seed)
            model.train()
            seen, losses = 0, []
            for step in range(steps):
                picked = torch.randint(len(rows), (plan.batch_size,), generator=order).tolist()
                loss = model(**encode(tokenizer, [rows[i] for i in picked], plan.max_length,
                                      model.device)).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                seen, losses = seen + len(picked), losses + [loss.item()]
                if not task.progress(step + 1, steps):
                    break  # the round closed for us, or we are asked to stop
            model.eval()
            if task.is_open:
                task.submit(model, num_samples=seen, metrics={"train_loss": sum(losses) / steps})
        fed.save_final(options.out)


if __name__ == "__main__":
    main()
