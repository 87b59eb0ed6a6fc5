"""Library code behind train_network.py: arguments, configs, data, model families, training helpers."""
