// SPDX-License-Identifier: GPL-2.0
/* ftrace_regs_set_instruction_pointer() (6.7+) */
#include <linux/ftrace.h>
static __maybe_unused void dbd_probe(struct ftrace_regs *fr) { ftrace_regs_set_instruction_pointer(fr, 0UL); }
