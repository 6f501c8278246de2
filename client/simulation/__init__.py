"""``fedrot simulate``: a whole federation in one process (or with Ray tasks), reusing the client
daemon's local training and the server's strategies.

    from fedrot_client.simulation import SimulationConfig, run_simulation, wordnet_federation

    config = SimulationConfig(model=ModelSpec("minilm", num_labels=45), strategy="fedrot",
                              num_clients=10, rounds=10)
    data = wordnet_federation(10, alpha=0.1, seed=0, eval_size=200, per_client=300)
    result = run_simulation(config, data)      # result.rounds: RoundMetrics per round
"""

from fedrot_client.simulation.client_basis import ClientBasis
from fedrot_client.simulation.client_starts import ClientInit
from fedrot_client.simulation.config import BackendName, SimulationConfig
from fedrot_client.simulation.engine import RoundMetrics, SimulationResult, run_simulation
from fedrot_client.simulation.federated_data import (
    FederatedData,
    file_federation,
    partition_dataset,
    wordnet_federation,
)

__all__ = [
    "BackendName",
    "ClientBasis",
    "ClientInit",
    "FederatedData",
    "RoundMetrics",
    "SimulationConfig",
    "SimulationResult",
    "file_federation",
    "partition_dataset",
    "run_simulation",
    "wordnet_federation",
]
