"""Privacy for federated fine-tuning: differentially private training and aggregation."""
