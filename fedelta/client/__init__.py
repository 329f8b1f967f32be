"""Client side: a site's session (its replies and the state it keeps), the ClientApp
over it, and the local training it runs on the site's data."""
