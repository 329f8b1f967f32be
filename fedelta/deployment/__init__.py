"""A secured multi-site deployment: certificates and keys, and the Flower commands
that start the SuperLink and each site's SuperNode with them."""
