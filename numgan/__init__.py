"""numgan: a reference PyTorch companion to "The Numerics of GANs" (Mescheder, Nowozin, Geiger, NIPS 2017).

Sign convention (used by every module): the game vector field is the paper's ascent field

    v(x) = ( -grad_theta L_G(theta, phi),  -grad_phi L_D(theta, phi) ),   x = (theta, phi),

generator parameters theta first, discriminator parameters phi second, where L_G and L_D are
the losses each player minimises (paper Sec. 2, Eq. 1 with utilities f = -L_G, g = -L_D).
Simultaneous gradient ascent is x <- x + h v(x); its Jacobian v'(x) has eigenvalues with
negative real part at a stable equilibrium (paper Sec. 3). Consensus optimisation follows
w(x) = v(x) - gamma * grad L(x),  L(x) = 1/2 ||v(x)||^2,  grad L = v'(x)^T v(x)  (paper Eq. 16-17).
"""
__version__ = "0.1.0"
