"""The three uses: ``convert`` (the pipeline), ``verify``, exporting from a training job (the Trainer
callback, ``export_engine``, ``export_adapter``), and running inside a distributed job.
"""
