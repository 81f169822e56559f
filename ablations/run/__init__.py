"""Running cells: one cell -> one MLflow run (`runner`), the queue that hands cells to workers
(`cellqueue`, `storage`, `heartbeat`), the workers and their launcher (`worker`, `launcher`, `options`,
`output`), the time limit (`timelimit`), progress lines (`progress`) and the preflight check (`preflight`)."""
