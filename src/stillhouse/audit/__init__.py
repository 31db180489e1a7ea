"""Audit: was a suspect model distilled from a reference teacher? Identity probes, watermark radioactivity,
stylometric attribution, and a verdict over them (`run.run_audit`, `stillhouse audit`)."""
