"""phantom"""
