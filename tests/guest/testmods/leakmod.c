// SPDX-License-Identifier: GPL-2.0
/* Harness self-test: loading this module leaks eight small allocations for kmemleak to find. */
#include <linux/module.h>
#include <linux/slab.h>

#define LEAKMOD_OBJECTS 8

/* Written through so the compiler keeps the allocations; cleared so no reference remains. */
static void *volatile leakmod_last;

static noinline void leakmod_leak_one(int i)
{
	leakmod_last = kmalloc(512 + i, GFP_KERNEL);
}

static int __init leakmod_init(void)
{
	int i;

	for (i = 0; i < LEAKMOD_OBJECTS; i++)
		leakmod_leak_one(i);
	leakmod_last = NULL;
	return 0;
}

static void __exit leakmod_exit(void)
{
}

module_init(leakmod_init);
module_exit(leakmod_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("harness self-test: leaks eight kmalloc objects at load");
