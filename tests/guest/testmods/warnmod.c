// SPDX-License-Identifier: GPL-2.0
/* Harness self-test: loading this module prints one kernel WARNING with a call trace. */
#include <linux/module.h>
#include <linux/bug.h>

static int __init warnmod_init(void)
{
	WARN_ON(1);
	return 0;
}

static void __exit warnmod_exit(void)
{
}

module_init(warnmod_init);
module_exit(warnmod_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("harness self-test: WARN_ON(1) at load");
