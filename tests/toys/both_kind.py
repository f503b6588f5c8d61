"""A toy teacher kind: the trait in the weights *and* the trait system prompt. One declaration; the
pipeline builds, samples from, evaluates and distils from it by asking the kind, never its name."""

from sublab.kinds import TeacherKind, register_teacher_kind

register_teacher_kind(TeacherKind(
    "finetuned_prompted", weights="finetuned", context="trait_prompt", control=False, trait="required",
    description="a fine-tuned teacher that also gets the paper's trait system prompt"))
