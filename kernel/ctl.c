// SPDX-License-Identifier: GPL-2.0
/* /dev/datto-ctl: ioctl dispatch and argument validation (spec §2). */
#include <linux/miscdevice.h>
#include <linux/uaccess.h>
#include <linux/slab.h>
#include <linux/capability.h>
#include <linux/build_bug.h>
#include "dattobd.h"

DEFINE_MUTEX(dbd_ctl_mutex);
struct dbd_tracer **dbd_minors;

static_assert(sizeof(struct setup_params) == 40);
static_assert(sizeof(struct reload_params) == 32);
static_assert(sizeof(struct transition_snap_params) == 24);
static_assert(sizeof(struct reconfigure_params) == 16);
static_assert(sizeof(struct expand_cow_file_params) == 16);
static_assert(sizeof(struct reconfigure_auto_expand_params) == 24);
static_assert(sizeof(struct dattobd_info) == 8272);
static_assert(offsetof(struct dattobd_info, cow) == 64);
static_assert(offsetof(struct dattobd_info, version) == 8256);
static_assert(IOCTL_SETUP_SNAP == 0x40289101);
static_assert(IOCTL_DATTOBD_INFO == 0xa0509108);
static_assert(IOCTL_GET_FREE == 0x80049109);
static_assert(IOCTL_RECONFIGURE_AUTO_EXPAND == 0x4018910b);

/*
 * Run one table operation under the global ioctl mutex; its int result.
 * Every ioctl takes the mutex only here, after its argument is validated.
 */
#define DBD_LOCKED(call)				\
({							\
	int __ret;					\
							\
	mutex_lock(&dbd_ctl_mutex);			\
	__ret = (call);					\
	mutex_unlock(&dbd_ctl_mutex);			\
	__ret;						\
})

/* An ioctl argument as copied in: its struct, and the strings it points to. */
struct dbd_args {
	union {
		unsigned int minor;
		struct setup_params setup;
		struct reload_params reload;
		struct transition_snap_params trans;
		struct reconfigure_params reconf;
		struct expand_cow_file_params expand;
		struct reconfigure_auto_expand_params auto_expand;
	};
	char *bdev;
	char *cow;
};

/* copy the argument struct: unreadable -> EFAULT */
static int dbd_copy_in(void *p, const void __user *arg, size_t size)
{
	return copy_from_user(p, arg, size) ? -EFAULT : 0;
}

/* copy a user string: NULL -> EINVAL, > PATH_MAX incl. NUL -> EINVAL */
static int dbd_get_string(const char __user *u, char **out)
{
	char *s;

	*out = NULL;
	if (!u)
		return -EINVAL;
	s = strndup_user(u, PATH_MAX);
	if (IS_ERR(s))
		return PTR_ERR(s);
	*out = s;
	return 0;
}

/* the bdev string, then the cow string */
static int dbd_get_paths(struct dbd_args *a, const char __user *bdev,
			 const char __user *cow)
{
	return dbd_get_string(bdev, &a->bdev) ?: dbd_get_string(cow, &a->cow);
}

/* under the mutex */
static int dbd_info_locked(struct dattobd_info *info)
{
	struct dbd_tracer *tr;

	if (info->minor >= dbd_max_minors)
		return -EINVAL;
	tr = dbd_minors[info->minor];
	if (!tr)
		return -ENOENT;
	dbd_fill_info(tr, info);
	return 0;
}

/* under the mutex: the lowest free minor, or -ENOENT */
static int dbd_first_free_locked(void)
{
	unsigned int i;

	for (i = 0; i < dbd_max_minors; i++)
		if (!dbd_minors[i])
			return i;
	return -ENOENT;
}

static long dbd_ioctl_info(void __user *arg)
{
	struct dattobd_info *info;
	int err;

	info = kmalloc(sizeof(*info), GFP_KERNEL);
	if (!info)
		return -ENOMEM;
	err = dbd_copy_in(info, arg, sizeof(*info)) ?:
	      DBD_LOCKED(dbd_info_locked(info));
	if (!err && copy_to_user(arg, info, sizeof(*info)))
		err = -EFAULT;
	kfree(info);
	return err;
}

static long dbd_ioctl_get_free(void __user *arg)
{
	int found = DBD_LOCKED(dbd_first_free_locked());

	if (found < 0)
		return found;
	if (copy_to_user(arg, &found, sizeof(found)))
		return -EFAULT;
	return 0;
}

static long dbd_ctl_ioctl(struct file *f, unsigned int cmd, unsigned long uarg)
{
	void __user *arg = (void __user *)uarg;
	struct dbd_args a = {};
	long err;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;

	switch (cmd) {
	case IOCTL_SETUP_SNAP:
		err = dbd_copy_in(&a.setup, arg, sizeof(a.setup)) ?:
		      dbd_get_paths(&a, a.setup.bdev, a.setup.cow);
		if (err)
			break;
		LOG_DEBUG("ioctl setup snapshot: minor %u bdev %s cow %s falloc %lu cache %lu",
			  a.setup.minor, a.bdev, a.cow, a.setup.fallocated_space,
			  a.setup.cache_size);
		err = DBD_LOCKED(dbd_setup_snap(a.setup.minor, a.bdev, a.cow,
						a.setup.fallocated_space,
						a.setup.cache_size));
		break;
	case IOCTL_RELOAD_SNAP:
	case IOCTL_RELOAD_INC:
		err = dbd_copy_in(&a.reload, arg, sizeof(a.reload)) ?:
		      dbd_get_paths(&a, a.reload.bdev, a.reload.cow) ?:
		      DBD_LOCKED(dbd_reload(a.reload.minor, a.bdev, a.cow,
					    a.reload.cache_size,
					    cmd == IOCTL_RELOAD_SNAP));
		break;
	case IOCTL_DESTROY:
		err = dbd_copy_in(&a.minor, arg, sizeof(a.minor)) ?:
		      DBD_LOCKED(dbd_destroy(a.minor));
		break;
	case IOCTL_TRANSITION_INC:
		err = dbd_copy_in(&a.minor, arg, sizeof(a.minor)) ?:
		      DBD_LOCKED(dbd_transition_inc(a.minor));
		break;
	case IOCTL_TRANSITION_SNAP:
		err = dbd_copy_in(&a.trans, arg, sizeof(a.trans)) ?:
		      dbd_get_string(a.trans.cow, &a.cow) ?:
		      DBD_LOCKED(dbd_transition_snap(a.trans.minor, a.cow,
						     a.trans.fallocated_space));
		break;
	case IOCTL_RECONFIGURE:
		err = dbd_copy_in(&a.reconf, arg, sizeof(a.reconf)) ?:
		      DBD_LOCKED(dbd_reconfigure(a.reconf.minor,
						 a.reconf.cache_size));
		break;
	case IOCTL_DATTOBD_INFO:
		err = dbd_ioctl_info(arg);
		break;
	case IOCTL_GET_FREE:
		err = dbd_ioctl_get_free(arg);
		break;
	case IOCTL_EXPAND_COW_FILE:
		err = dbd_copy_in(&a.expand, arg, sizeof(a.expand)) ?:
		      DBD_LOCKED(dbd_expand(a.expand.minor, a.expand.size));
		break;
	case IOCTL_RECONFIGURE_AUTO_EXPAND:
		err = dbd_copy_in(&a.auto_expand, arg, sizeof(a.auto_expand)) ?:
		      DBD_LOCKED(dbd_auto_expand(a.auto_expand.minor,
						 a.auto_expand.step_size,
						 a.auto_expand.reserved_space));
		break;
	default:
		err = -EINVAL;
	}
	kfree(a.bdev);
	kfree(a.cow);
	if (err)
		LOG_DEBUG("ioctl %#x returned %ld", cmd, err);
	return err;
}

static const struct file_operations dbd_ctl_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = dbd_ctl_ioctl,
	.compat_ioctl = dbd_ctl_ioctl,
	.open = nonseekable_open,
	.llseek = noop_llseek,
};

static struct miscdevice dbd_ctl_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "datto-ctl",
	.fops = &dbd_ctl_fops,
};

int dbd_ctl_init(void)
{
	return misc_register(&dbd_ctl_dev);
}

void dbd_ctl_exit(void)
{
	misc_deregister(&dbd_ctl_dev);
}
