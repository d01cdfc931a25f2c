"""`dalle serve`: the web page and the JSON API over a `Pipeline` (the optional extra dalle[serve])."""
