"""Client side: the ClientApp and the local training it runs on a site's data."""
