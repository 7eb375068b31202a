"""Keras -> ONNX serving bundle: conversion, exact graph rewrites, INT8 quantization, the parity gate."""
