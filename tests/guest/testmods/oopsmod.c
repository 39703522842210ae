// SPDX-License-Identifier: GPL-2.0
/*
 * Harness self-test: loading this module oopses in a kernel thread (a NULL
 * dereference) while insmod waits for that thread forever, as a driver's
 * caller would after the driver died holding what it waits for.  The shell
 * command never returns; only the console says why.
 */
#include <linux/module.h>
#include <linux/kthread.h>
#include <linux/completion.h>

static DECLARE_COMPLETION(oopsmod_done);
static int *oopsmod_null;

static int oopsmod_thread(void *arg)
{
	*READ_ONCE(oopsmod_null) = 1;	/* Oops: the thread dies, done is never completed */
	complete(&oopsmod_done);
	return 0;
}

static int __init oopsmod_init(void)
{
	struct task_struct *t = kthread_run(oopsmod_thread, NULL, "oopsmod");

	if (IS_ERR(t))
		return PTR_ERR(t);
	return wait_for_completion_killable(&oopsmod_done);
}

static void __exit oopsmod_exit(void)
{
}

module_init(oopsmod_init);
module_exit(oopsmod_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("harness self-test: an oops that leaves the loading command waiting");
