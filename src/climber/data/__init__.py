"""Event data: schema, named loaders, prepare + split, synthetic data, MSE sequences, samples."""
