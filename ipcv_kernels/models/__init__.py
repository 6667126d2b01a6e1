"""The Hugging Face adapters, one module per family kind: ``qwen2_vl``, ``qwen2_5_vl``,
``qwen3_vl``, ``internvl``, ``clip_vit`` (CLIP / SigLIP towers: LLaVA, LLaVA-NeXT, OneVision, Gemma 3,
PaliGemma) and ``idefics3`` (Idefics3, SmolVLM). Each ``FamilyAdapter`` subclass tells the engine
(``ipcv_kernels.engine``) where its family's blocks, items, segments and rotary tables live; the
family table (``ipcv_kernels.families``) names the adapter of each family, and ``ipcv_kernels.api``
patches models with them.
"""
