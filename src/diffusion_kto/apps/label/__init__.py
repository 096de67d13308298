"""The labeling app: a queue folder of generated images (``dkto generate``), people's likes and dislikes in SQLite
(:mod:`.store`), the web app that takes them (:mod:`.server`) and their export as feedback (:mod:`.export`)."""
