"""Audit: was a suspect model distilled from a reference teacher? (`radioactivity`: the watermark test so far.)"""
