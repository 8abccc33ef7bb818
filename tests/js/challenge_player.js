// A synthetic stand-in for YouTube's player script (base.js), written for Legato's tests.
// It has the shape yt-dlp-ejs's solver looks for: one IIFE whose body holds a function that
// builds a URL object and calls X.set("alr", "yes") on it; the first other method of that
// object's prototype rewrites the "n" and "s" parameters. Here: n is reversed and suffixed
// with its length, s is reversed with its first character dropped.
(function (g) {
  'use strict';
  function Q(base) {
    this.base = base;
    this.params = {};
  }
  Q.prototype.scramble = function () {
    var n = this.params.n;
    if (n) {
      this.params.n = n.split('').reverse().join('') + '.' + n.length;
    }
    var s = this.params.s;
    if (s) {
      this.params.s = s.split('').reverse().join('').slice(1);
    }
  };
  Q.prototype.set = function (key, value) {
    this.params[key] = value;
  };
  Q.prototype.get = function (key) {
    return this.params[key];
  };
  Q.prototype.clone = function () {
    var copy = new Q(this.base);
    copy.params = Object.assign({}, this.params);
    return copy;
  };
  function makeUrl(base, key, signature) {
    var url = new Q(base);
    url.set('alr', 'yes');
    if (signature) {
      url.set(key, signature);
    }
    return url;
  }
  g.makeUrl = makeUrl;
}).call(this, {});
