"""The CLI's side of control: reaching processes on this machine (``process``) and nodes through
a run's room (``room``), finding sessions and runs (``finder``, ``lookup``), and the terminal
(``terminal``: attach and text logs)."""
