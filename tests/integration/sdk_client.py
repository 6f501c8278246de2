"""An SDK client for the restart tests: one small AdamW step per round on its own data.

The connection comes from the FEDROT_CLIENT_* environment. Every round it trains appends a
line ``trained <round>`` to ``<state_dir>/trained.log``. ``FEDROT_TEST_DIE_AT`` injects a fault
in the first life only (a ``died`` marker in the state folder remembers it):

- ``saved``: the process dies (exit 9) once its update is saved, before a byte is sent;
- ``accepted``: it dies once the server accepted the update, before the state folder says so;
- ``training``: it writes ``<state_dir>/training`` in round 0's loop body and waits there
  (for a signal).
"""

import logging
import os
import sys
import time
from pathlib import Path

import torch

import fedrot_client
from fedrot_client.ledger import RoundLedger
from fedrot_client.state import ClientState

STATE = Path(os.environ["FEDROT_CLIENT_STATE_DIR"])
FAULT = os.environ.get("FEDROT_TEST_DIE_AT", "")
FIRST_LIFE = not (STATE / "died").exists()


def die_after(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        (STATE / "died").write_text(FAULT)
        os._exit(9)
        return result

    return wrapper


if FIRST_LIFE and FAULT == "saved":
    RoundLedger.save_pending = die_after(RoundLedger.save_pending)
if FIRST_LIFE and FAULT == "accepted":
    ClientState.record_completed = die_after(ClientState.record_completed)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with fedrot_client.connect() as fed:
        model, tokenizer = fed.build_model(), fed.tokenizer
        batch = tokenizer(["1+1=2", "2+2=4"], return_tensors="pt", padding=True)
        for task in fed.tasks():
            task.load_into(model)
            if FIRST_LIFE and FAULT == "training" and task.round_index == 0:
                (STATE / "died").write_text(FAULT)
                (STATE / "training").write_text("ready")
                while True:  # "training" until a signal ends the process
                    time.sleep(0.05)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=task.training.learning_rate)
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            with (STATE / "trained.log").open("a") as log:
                log.write(f"trained {task.round_index}\n")
            task.submit(model, num_samples=2, metrics={"train_loss": loss.item()})
    print("stopped" if fed.stopped else "finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
