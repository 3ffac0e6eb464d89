"""Federated fine-tuning on Flower: many devices, one model (``pip install "gfcompiler[federated]"``).

Each client is a `gfcompiler.runtime.Trainer` on the compiled artifacts and its own data;
a round sends only the trained tensors (the last N convs and the head), the client trains
E local epochs with gradient filtering, and the server aggregates with Flower's FedAvg
(FedProx or FedAdam selectable), evaluates the global model on held-out data and saves
it as the run directory's checkpoint, so ``gfc eval`` and ``gfc export`` work on it.

* settings: `FederationConfig` and its form in Flower's run config;
* partition: Dirichlet label-skewed shards, the held-out set, what each client loads;
* local: one client's round without Flower (`train_locally`);
* strategies: Flower's strategies with traffic counts and non-finite updates dropped;
* client_app / server_app: the Flower apps (``gfcompiler.federated.client_app:app``,
  ``gfcompiler.federated.server_app:app``), for the simulation and deployment engines;
* simulation: ``gfc federate`` (Flower's simulation engine, in this process);
* cli: the ``gfc federate`` parser.

Only the modules that need it import ``flwr``; settings, partition, local and cli do not,
so ``gfc --help`` works without Flower installed.
"""
